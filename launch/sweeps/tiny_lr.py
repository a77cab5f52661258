"""Learning rates of configs/tiny.py, 200 steps each: python launch/sweep.py launch/sweeps/tiny_lr.py"""
config = "configs/tiny.py"
base = {"train.steps": 200, "train.eval_every": 100, "train.sample_tokens": 0,
        "train.progress": False}
grid = {"optim.lr": [1e-3, 3e-3, 1e-2]}

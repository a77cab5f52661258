"""One process of test_data's two-process loader test: `python multihost_loader.py PROCESS_ID
PORT DATA_DIR OUT_DIR`. Joins a 2-process jax.distributed run on localhost (gloo collectives),
builds 3 batches on a data=8 mesh, and saves its rows, its local data and the assembled global
batch (all-gathered) for the test to compare."""
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

process_id, port, data_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

from lm import sharding  # noqa: E402
from lm.config import MeshConfig  # noqa: E402
from lm.data.dataset import Dataset  # noqa: E402
from lm.data.loader import Loader  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
mesh = sharding.make_mesh(MeshConfig(data=8))
loader = Loader(Dataset(data_dir).split("train"), 16, 32, seed=3,
                sharding=sharding.batch_sharding(mesh), prefetch=2)
for step in range(3):
    state = loader.state
    batch = next(loader)
    np.save(f"{out}/rows{process_id}-{step}.npy", loader.rows)
    np.save(f"{out}/local{process_id}-{step}.npy", loader.global_batch(state, loader.rows))
    np.save(f"{out}/global{process_id}-{step}.npy",
            multihost_utils.process_allgather(batch, tiled=True))
loader.close()
jax.distributed.shutdown()

"""`python -m lm.plan --config CFG [--config.a.b=V ...] [--devices N] [--json] [--compile]
[--tokens N [--mfu X] [--device-kind NAME]]`

Per-device memory, FLOPs and communication of one train step, for any mesh: the model is built
abstractly (`lm.model.abstract_model`), so a 175B model on 1,024 GPUs plans on a laptop. With
`--tokens`, also the days a run of that many tokens takes on the planned devices (`train_time`).

Accounting (bytes per device):
- params: each parameter / the devices its `mesh.rules` shard it over (x pipeline stages for the
  stacked layers), in `precision.param_dtype`;
- grads: the same in the parameter dtype, sharded like the optimizer state under zero2/zero3
  (ZeRO's accounting: 2 bytes per parameter in fp16); with microbatches, plus their float32 sum;
- optimizer: float32 master weights (`precision.master_weights`) + the optimizer's moments (Adam,
  LAMB: 2; SGD, LARS: 1 momentum) in float32 with masters, else in the parameter dtype, sharded
  by the optimizer-state rules. fp16 + masters + Adam = 2 + 2 + 12 bytes per parameter;
- activations: what `lm.model`'s backward keeps per layer (`layer_arrays`: counted from the
  model's residuals, in the spirit of Korthikanti et al. 2022 without dropout: 4 + 2k/n + 2 +
  as/h + F/h (2F/h for SwiGLU) arrays of [s, b, h] without remat, the matmul-sharded ones / t),
  in the compute dtype, for one microbatch and the layers of one stage, plus the float32 logits
  and their gradient;
- workspace: the layer in flight in the backward: its weights gathered and cast, its whole
  weight gradient before the reduce-scatter, and its activations' gradients.

Checked against XLA's memory analysis of the compiled step (`--compile`; tests/test_plan.py:
within 15% for every preset with scanned layers, in float32). Known differences: XLA:CPU
computes bfloat16 in float32 (compare bf16 on a GPU); with `model.scan_layers=False` its
scheduler may gather every layer's weights at once (zero3 on configs/tiny.py: 1.6x the
estimate); under zero1 GSPMD reduce-scatters the gradients anyway (zero2's memory), so the
estimate, which keeps ZeRO's accounting, is an upper bound there.
- FLOPs: 6 x matmul parameters + 12 L T d per token (PaLM's convention), for the global batch;
- communication, bytes each device sends per step with ring collectives: gradient all-reduce
  2P(n-1)/n over the data-parallel replicas (zero3 and fsdp: 3P, parameters gathered in forward
  and backward), 4 all-reduces of the block's activations per layer over `tensor` (6 with full
  remat), one activation per microbatch and direction over `pipeline`.
- time to train N tokens: N / (batch_size x seq_len) steps of the model FLOPs above (remat's
  recomputation excluded, as MFU counts them) on the devices at a fraction `--mfu` (default
  0.4) of their datasheet peak in `precision.compute_dtype` (lm.hardware; `--device-kind`,
  default this machine's). GPT-3 175B on 1,024 A100s, 300B tokens at 35%: about 34 days, the
  figure of Narayanan et al. 2021 (140 TFLOP/s per GPU counting recomputation: 8/6 x model
  FLOPs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax

from lm import hardware, sharding
from lm.tasks import predictions
from lm.config import ConfigError, RunConfig, from_config_dict, load_config_file, override
from lm.model import abstract_model, param_count
from lm.pipeline import Pipeline

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MOMENTS = {"adamw": 2, "lamb": 2, "nvlamb": 2, "lars": 1, "sgd": 1}
GB = 1e9
DAY = 86400.0
DEFAULT_MFU = 0.4


def plan(run: RunConfig, devices: int) -> dict:
    m, t, prec = run.model, run.train, run.precision
    shape = sharding.resolve_mesh_shape(run.mesh, devices)
    lay = sharding.layout(run.mesh.rules)
    _, abstract = abstract_model(m, prec, run.task)
    names = jax.tree.leaves(sharding.logical_names(abstract),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    sizes = [x.size for x in jax.tree.leaves(abstract)]
    n_params = param_count(abstract)
    pb, cb = BYTES[prec.param_dtype], BYTES[prec.compute_dtype]
    master = run.precision.master_weights
    moments = MOMENTS[run.optim.name] - (run.optim.name in ("sgd", "lars") and
                                         run.optim.momentum == 0)
    state_elem = (4 if master else 0) + (4 if master else pb) * moments
    params_b = grads_b = opt_b = layer_b = stage_b = 0.0
    micro = t.microbatches
    gathered = {**shape, "data": 1, "fsdp": 1, "pipeline": 1}
    for spec_names, size in zip(names, sizes):
        spec_p = sharding.logical_to_spec(tuple(spec_names), lay.params)
        p_ways = sharding.devices_along(spec_p, shape)  # the stacked layers: / pipeline stages
        o_ways = sharding.devices_along(
            sharding.logical_to_spec(tuple(spec_names), lay.opt), shape)
        g_ways = o_ways if lay.scatter_grads else p_ways
        params_b += size * pb / p_ways
        # Gradients in the parameter dtype; with microbatches, also their float32 sum.
        grads_b += size * (pb + (4 if micro > 1 else 0)) / g_ways
        opt_b += size * state_elem / o_ways
        if "layers" in tuple(spec_names):
            stage_b += size / p_ways  # parameters of this device's layers
            # one layer's weights, gathered, and its gradient
            layer_b += (size / m.num_layers) * (cb + pb) / \
                sharding.devices_along(spec_p, gathered)

    # Activations, for this device's layers: one microbatch (train.microbatches) without a
    # pipeline; with one, a pipeline micro-batch per iteration of the schedule (GPipe keeps
    # them all), remat applying to a stage's layers as a whole.
    stages = shape["pipeline"]
    pipe = None
    if stages > 1:
        pipe = Pipeline(stages, run.pipeline.microbatches, run.pipeline.virtual_stages,
                        run.pipeline.schedule)
    data_ways = shape["data"] * shape["fsdp"]
    b_step = t.batch_size / data_ways / micro  # sequences per device per train.microbatches slice
    b = b_step / pipe.microbatches if pipe else b_step  # per (pipeline) micro-batch
    array_b = b * t.seq_len * m.d_model * cb / shape["sequence"]
    kept, full, layer_input = layer_arrays(m, t.seq_len, shape, lay)
    recompute = full if m.remat != "none" else 0.0  # one layer, rebuilt in the backward
    if pipe is None:
        arrays = kept * m.num_layers + recompute
        layers_run = m.num_layers
    elif pipe.schedule == "1f1b":
        chunk = m.num_layers // (stages * pipe.virtual_stages)  # layers per stage and pass
        layers_run = pipe.iterations * chunk
        # The inputs of the 2S - 1 micro-batches between forward and backward, the one stage
        # whose backward runs (its forward recomputed: all of it kept, or, with remat, its
        # layer inputs and one layer), and the forward and gradient hand-offs; nothing of M
        # (micro-batches are embedded as they start).
        working = kept * chunk if m.remat == "none" else layer_input * chunk + recompute
        arrays = pipe.kept_microbatches + working + 2
    else:
        chunk = m.num_layers // (stages * pipe.virtual_stages)  # layers per stage and pass
        layers_run = pipe.iterations * chunk
        stage_kept = layer_input if m.remat == "full" else kept * chunk
        # + the micro-batch buffer
        arrays = pipe.iterations * stage_kept + pipe.microbatches + recompute * chunk
    head_positions = {"lm": t.seq_len, "classify": 0, "span": 0}.get(
        run.task.name, predictions(run.task, t.seq_len))  # vocabulary logits per sequence
    acts_b = arrays * array_b + logits_bytes(m, b, head_positions, shape, lay)
    # The layer in flight in the backward pass: its weights gathered (zero3/fsdp) and cast,
    # its full weight gradient before the reduce-scatter, and its activations' gradients.
    work_b = layer_b + full * array_b
    if pipe:  # the stage's layers regrouped into the schedule's layout, and their gradients
        work_b += stage_b * (cb + pb)
        if pipe.virtual_stages > 1 and m.remat == "none" and pipe.schedule != "1f1b":
            # a pass's layers, selected per iteration, kept per iteration for the backward
            acts_b += stage_b / pipe.virtual_stages * cb * pipe.iterations
    s, h, a = t.seq_len, m.d_model, m.num_heads
    tp, sp = shape["tensor"], shape["sequence"]

    flops = model_flops(m, run.task, n_params, t.batch_size, s)

    # Communication per step, bytes sent by one device.
    comm = {axis: 0.0 for axis in shape}
    p_local = params_b  # this device's share of the parameters
    grad_factor = 3 if lay.gather_params else 2
    d, f = shape["data"], shape["fsdp"]
    if lay.fsdp_only:  # sharded over fsdp, replicated over data
        comm["fsdp"] += grad_factor * p_local * f * (f - 1) / f
        comm["data"] += 2 * p_local * (d - 1) / d
    else:  # one group of d x f replicas: fsdp inner ring, data outer
        full = p_local * (d * f if lay.zero3 else 1)
        comm["fsdp"] += grad_factor * full * (f - 1) / f
        comm["data"] += grad_factor * full / f * (d - 1) / d
    act_bytes = b * s * h * cb  # one [b, s, d] array of one micro-batch
    reduces = 6 if m.remat == "full" else 4
    comm["tensor"] = reduces * layers_run * act_bytes * 2 * (tp - 1) / tp * micro
    comm["sequence"] = (2 * layers_run * act_bytes * m.num_kv_heads / a * (sp - 1) *
                        micro if sp > 1 else 0.0)
    if pipe:
        # Each iteration sends the stage's output on, forward and backward; the interleaved
        # layout regroups the layer parameters (and gradients) with an all-to-all.
        comm["pipeline"] = 2 * pipe.iterations * act_bytes / sp * micro
        if pipe.virtual_stages > 1:
            layer_share = sum(size for n_, size in zip(names, sizes) if "layers" in tuple(n_))
            comm["pipeline"] += 2 * params_b * layer_share / n_params * (stages - 1) / stages
    return {
        "mesh": shape, "rules": run.mesh.rules, "devices": devices, "params": n_params,
        "params_bytes": params_b, "grads_bytes": grads_b, "optimizer_bytes": opt_b,
        "state_bytes": params_b + grads_b + opt_b, "activations_bytes": acts_b,
        "workspace_bytes": work_b, "total_bytes": params_b + grads_b + opt_b + acts_b + work_b,
        "flops_per_step": flops, "flops_per_device": flops / devices,
        # Hardware FLOPs: full remat runs each layer's forward twice (8N instead of 6N).
        # 1F1B recomputes each stage's forward in its backward, as full remat does.
        "flops_with_recompute": flops * (8 / 6 if m.remat == "full" or (
            pipe and pipe.schedule == "1f1b") else 1.0),
        "state_bytes_unsharded": n_params * (2 * pb + state_elem),
        "comm_bytes": comm,
        "pipeline_bubble": pipe.bubble if pipe else 0.0,
        "pipeline": ({"stages": stages, "schedule": run.pipeline.schedule,
                      "microbatches": pipe.microbatches,
                      "virtual_stages": pipe.virtual_stages,
                      "layers_per_stage": m.num_layers // stages} if pipe else None),
    }


def model_flops(m, task, n_params: int, batch: int, s: int) -> float:
    """Model FLOPs of one step: 6 per matmul parameter and token + 12 L s d per token for
    attention (PaLM's convention; lookups are free). BERT's output layer (the MLM transform and
    the tied decoder) runs on the P predicted positions only, its pooler and NSP head on one."""
    h = m.d_model
    lookup = (m.max_len * h if m.learned_positions else 0) + (
        m.vocab_size * h if not m.tied_embeddings else 0)
    if m.style == "bert":
        lookup += m.type_vocab_size * h
    if not task.masked:  # a fine-tuning head is counted as if it ran at every token (small)
        return (6 * (n_params - lookup) + 12 * m.num_layers * s * h) * batch * s
    head = m.vocab_size * h + h * h + m.vocab_size + h  # decoder, transform (+ biases)
    pooled = (h * h + 3 * h + 2) if m.nsp_head else 0
    body = 6 * (n_params - lookup - head - pooled) + 12 * m.num_layers * s * h
    p = predictions(task, s)
    return (body * s + 6 * head * p + 6 * pooled) * batch


def train_time(run: RunConfig, p: dict, tokens: float, mfu: float = DEFAULT_MFU,
               device_kind: str | None = None) -> dict:
    """The days `tokens` take at `mfu` on plan `p`'s devices of `device_kind` (a device_kind
    or short name known to lm.hardware; default: this machine's), as plan fields."""
    kind = hardware.this_device_kind() if device_kind is None else device_kind
    if not tokens > 0:
        raise ConfigError(f"--tokens must be positive, got {tokens:g}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1] (a fraction of the peak, e.g. 0.4), got "
                          f"{mfu:g}")
    if hardware.part(kind) is None:
        what = (f"this machine's device ({kind!r}) has no known peak FLOP/s: pass --device-kind"
                if device_kind is None else f"--device-kind: no peak FLOP/s known for {kind!r}")
        raise ConfigError(f"{what}; known: {', '.join(hardware.known_names())}")
    dtype = run.precision.compute_dtype
    peak = hardware.peak_flops(kind, dtype)
    if peak is None:
        raise ConfigError(f"--device-kind: {hardware.part(kind)} has no {dtype} peak "
                          "(precision.compute_dtype); choose another dtype or part")
    steps = tokens / (run.train.batch_size * run.train.seq_len)
    seconds = p["flops_per_step"] * steps / (p["devices"] * peak * mfu)
    return {"tokens": tokens, "mfu": mfu, "device_kind": kind, "peak_flops": peak,
            "train_steps": steps, "train_days": seconds / DAY}


def layer_arrays(m, s: int, shape: dict, lay: sharding.Layout) -> tuple[float, float, float]:
    """Per layer, in [b, s, d_model] arrays of the compute dtype on one device: what the
    backward keeps with `model.remat` (kept), what one layer computes for it (full), and the
    layer input alone (input). Counted from `lm.model`'s residuals: the layer input, two norm
    outputs and the mid-layer residual, which tensor parallelism splits only with `sp` (the norm
    outputs not even then: the column-parallel matmuls keep them after their all-gather); q, k,
    v, the attention output, the probabilities (heads x s / d_model arrays) and the MLP's
    pre-activations, which it splits. With model.attention='cudnn' (flash attention) the
    backward keeps no probabilities ('auto' counts them: the plan does not know the backend)."""
    tp = shape["tensor"]
    n, k, d = m.num_heads, m.num_kv_heads, m.d_model
    mlp_in = (2 if m.style == "llama" else 1) * m.mlp_dim / d
    shared_div = tp if lay.sequence_parallel else 1
    probs = 0 if m.attention == "cudnn" else n * s / d  # flash attention keeps no [s, s]
    full = 2 / shared_div + 2 + (1 + 2 * k / n + 1 + probs + mlp_in) / tp
    if m.remat == "none":
        kept = full
    elif m.remat == "full":
        kept = 1 / shared_div
    elif m.remat == "dots":  # matmul outputs: q, k, v, MLP pre-activations, the projections
        kept = 3 / shared_div + (1 + 2 * k / n + 1 + mlp_in) / tp
    else:  # minimal: the layer input and the attention output
        kept = 1 / shared_div + 1 / tp
    return kept, full, 1 / shared_div


def logits_bytes(m, b: float, s: int, shape: dict, lay: sharding.Layout) -> float:
    """The float32 logits of `b` sequences and their gradient."""
    vocab_ways = shape["tensor"] if lay.tensor_parallel else 1
    return 2 * b * s * m.vocab_size * 4 / vocab_ways / shape["sequence"]


def compiled_memory(run: RunConfig, devices=None) -> dict:
    """XLA's memory analysis of the real train step on this machine's devices (fake CPU devices
    count; `devices`: a subset), for the same config: arguments (state + batch) and
    temporaries."""
    from lm import train  # only --compile needs the train step (and orbax, slow to import)
    mesh = sharding.make_mesh(run.mesh, devices=devices)
    with jax.set_mesh(mesh):
        trainer = train.build(run, mesh)
        batch = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(
            shape, "int32", sharding=sharding.batch_sharding(mesh, len(shape))),
            batch_shapes(run), is_leaf=lambda x: isinstance(x, tuple))
        ma = trainer.train_step.lower(trainer.abstract_state(), batch).compile().memory_analysis()
    return {"arguments_bytes": ma.argument_size_in_bytes, "temp_bytes": ma.temp_size_in_bytes,
            "total_bytes": ma.argument_size_in_bytes + ma.temp_size_in_bytes}


def batch_shapes(run: RunConfig):
    """The shapes of one step's batch: [B, T + 1] token ids, or a masked-LM task's dict."""
    b, t = run.train.batch_size, run.train.seq_len
    if run.task.name == "lm":
        return (b, t + 1)
    shapes = {"tokens": (b, t), "token_types": (b, t), "lengths": (b,)}
    extra = {"mlm_nsp": ("nsp_labels",), "classify": ("labels",),
             "span": ("start_positions", "end_positions")}.get(run.task.name, ())
    return shapes | {name: (b,) for name in extra}


def format_plan(p: dict) -> str:
    lines = [f"{p['params']:,} parameters on {p['devices']} devices, mesh "
             f"{ {k: v for k, v in p['mesh'].items() if v > 1} or 'single device'}, "
             f"rules {p['rules']}",
             "per device:" if not p["pipeline"] else
             f"per device (one stage of {p['pipeline']['stages']}: "
             f"{p['pipeline']['layers_per_stage']} layers):"]
    for key in ("params", "grads", "optimizer", "state", "activations", "workspace", "total"):
        lines.append(f"  {key:<12} {p[key + '_bytes'] / GB:10.3f} GB")
    lines.append(f"training state, unsharded: {p['state_bytes_unsharded'] / GB:,.1f} GB")
    lines.append(f"FLOPs per step {p['flops_per_step']:.3e} ({p['flops_per_device']:.3e} per "
                 f"device; {p['flops_with_recompute']:.3e} with remat recomputation)")
    comm = ", ".join(f"{k} {v / GB:.3f} GB" for k, v in p["comm_bytes"].items() if v)
    lines.append(f"sent per device per step: {comm or 'nothing'}")
    if "train_days" in p:
        lines.append(f"time to train {p['tokens']:,.0f} tokens ({p['train_steps']:,.0f} steps): "
                     f"{p['train_days']:,.1f} days on {p['devices']} x {p['device_kind']} at "
                     f"{p['mfu']:.0%} MFU of {p['peak_flops'] / 1e12:g} TFLOP/s")
    if p["pipeline"]:
        pp = p["pipeline"]
        lines.append(f"pipeline: {pp['schedule']}, {pp['microbatches']} micro-batches"
                     + (f", {pp['virtual_stages']} virtual stages" if pp["virtual_stages"] > 1
                        else "") + f", bubble {p['pipeline_bubble']:.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    parser.add_argument("--devices", type=int, help="devices to plan for (default: the mesh's "
                        "product, or this machine's devices when an axis is -1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--compile", action="store_true",
                        help="also compile the step on --devices fake CPU devices and print "
                        "XLA's memory analysis beside the estimate (small models)")
    parser.add_argument("--tokens", type=float, help="also the days a run of this many tokens "
                        "takes (300e9 or 300000000000)")
    parser.add_argument("--mfu", type=float, help="with --tokens: the fraction of the devices' "
                        f"peak FLOP/s reached, in (0, 1] (default {DEFAULT_MFU})")
    parser.add_argument("--device-kind", help="with --tokens: the part, e.g. A100, H100, "
                        "'TPU v5 lite' (default: this machine's jax.devices()[0].device_kind)")
    args, overrides = parser.parse_known_args(argv)
    if args.compile and args.devices:
        # Fake that many CPU devices (before jax starts its backend) to compile the real step.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        flat = {}
        for o in overrides:
            if not o.startswith("--config.") or "=" not in o:
                raise ConfigError(f"unexpected argument {o!r}; overrides are --config.a.b=VALUE")
            key, _, value = o[len("--config."):].partition("=")
            flat[key] = _parse(value)
        run = from_config_dict(override(load_config_file(args.config), **flat))
        sizes = run.mesh.shape().values()
        devices = args.devices or (math.prod(sizes) * math.prod(run.mesh.dcn_shape().values())
                                   if -1 not in sizes else jax.device_count())
        result = plan(run, devices)
        if args.tokens is not None:
            result.update(train_time(run, result, args.tokens, DEFAULT_MFU if args.mfu is None
                                     else args.mfu, args.device_kind))
        elif args.mfu is not None or args.device_kind is not None:
            raise ConfigError("--mfu and --device-kind need --tokens (the run to time)")
        if args.compile:
            result["xla"] = compiled_memory(run)
    except ConfigError as e:
        print(f"lm.plan: error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_plan(result))
        if "xla" in result:
            x = result["xla"]
            print(f"XLA (compiled here): arguments {x['arguments_bytes'] / GB:.3f} GB + temp "
                  f"{x['temp_bytes'] / GB:.3f} GB = {x['total_bytes'] / GB:.3f} GB")


def _parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "True": True, "False": False}.get(value, value)


if __name__ == "__main__":
    main()

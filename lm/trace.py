"""`python -m lm.trace WORKDIR_OR_XPLANE [--top N] [--json]`

Where the device time of a profiled run goes, in model terms. It reads the newest trace that
train.profile_steps wrote (WORKDIR/tb/plugins/profile/RUN/HOST.xplane.pb, or a given file) and
sums the time of each XLA op execution into groups named by the `jax.named_scope`s of lm.model
and lm.train: forward (`jvp(...)` in the op's scope path) or backward (`transpose(...)`) x
attention, mlp, the rest of a block, loss and other (embeddings, output head, final norm); then
optimizer, collectives (by HLO opcode), and other for ops of neither pass (other jitted
functions, unnamed ops). Plus the top-N ops by time (summed over executions, steps, devices).

What the trace holds (jax 0.10, XLA:CPU; see docs/profiling.md): each op execution is an event
with stats `hlo_op` (the HLO instruction name, e.g. `fusion.12`), `hlo_module` and `program_id`,
on the `/host:CPU` plane's XLA thread-pool lines (`tf_XLAEigen/...`); a while loop's event
contains its body's events (so time is counted exclusive of nested ops). The scope path is not
on the event: it is `metadata.op_name` of that instruction in the HLO module, which the
`/host:metadata` plane keeps as an "Hlo Proto" stat per program. jax's `ProfileData` reads the
events but does not expose plane metadata, so that part is read from the protobuf wire format
here. On GPUs the ops are kernels on the `/device:GPU:N` planes, carrying the same stats (a
derived `XLA Ops` line, where present, is used instead).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

SCOPES = ("attention", "mlp", "block", "loss")  # the first one in an op's path names its group
PASSES = (("backward", "transpose("), ("forward", "jvp("))  # transpose(jvp(..)) is backward
GROUPS = tuple(f"{p} {s}" for p, _ in PASSES[::-1] for s in (*SCOPES, "other")) + (
    "optimizer", "collectives", "other")
# Communication ops (and their async -start/-done halves), by HLO opcode or name: their own
# group, whatever the scopes (XLA's combiners join many ops' metadata into one all-reduce).
COLLECTIVE = re.compile(r"(all-reduce|all-gather|all-to-all|reduce-scatter|collective-|send|recv)")


class TraceError(Exception):
    """A missing, unreadable or unexpected trace (the message names the file)."""


def find_trace(path: str) -> str:
    """`path` if it is a file, else the newest *.xplane.pb of WORKDIR/tb (or a tb folder)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise TraceError(f"{path} does not exist: give a workdir, its tb/ folder or a "
                         ".xplane.pb file")
    found = [f for pattern in ("tb/plugins/profile/*/*.xplane.pb", "plugins/profile/*/*.xplane.pb",
                               "*.xplane.pb") for f in glob.glob(os.path.join(path, pattern))]
    if not found:
        raise TraceError(f"no trace in {path}: expected {path}/tb/plugins/profile/RUN/"
                         "HOST.xplane.pb (train with --config.train.profile_steps=START:STOP)")
    return max(found, key=os.path.getmtime)


def group(scope: str, *op: str) -> str:
    """The group of GROUPS that an op with this scope path (its HLO metadata op_name) and
    these HLO opcode / instruction name falls in."""
    names = set(re.split(r"[/()]", scope))
    if any(COLLECTIVE.match(o) for o in op):
        return "collectives"
    if "optimizer" in names:
        return "optimizer"
    for name, marker in PASSES:
        if marker in scope:
            return f"{name} {next((s for s in SCOPES if s in names), 'other')}"
    return "other"


def summarize(path: str, top: int = 10) -> dict:
    """Total op time (ms) of the trace at `path`, per group of GROUPS and for the top ops."""
    try:
        from jax.profiler import ProfileData
    except ImportError:
        raise TraceError("lm.trace needs jax.profiler.ProfileData, which this jax lacks: "
                         "install a newer jax") from None
    data = open(path, "rb").read()
    try:
        planes = list(ProfileData.from_serialized_xspace(data).planes)
    except Exception as e:  # the reader's own error type is not public
        raise TraceError(f"{path} is not a readable profiler trace (XSpace): {e}") from None
    ops, devices = {}, set()  # (program, module, op) -> [ns, count]; (plane, device ordinal)
    for plane, lines in op_events(planes).items():
        for events in lines:
            for op, stats, ns in exclusive_times(events):
                key = (stats.get("program_id"), stats.get("hlo_module", ""), op)
                entry = ops.setdefault(key, [0.0, 0])
                entry[0] += ns
                entry[1] += 1
                devices.add((plane, stats.get("device_ordinal")))
    if not ops:
        raise TraceError(f"no XLA op executions in {path}: expected events with an 'hlo_op' "
                         "stat on a '/device:*' or '/host:CPU' plane")
    scopes = hlo_scopes(data, path)
    groups = dict.fromkeys(GROUPS, 0.0)
    rows = []
    for (program, module, op), (ns, count) in ops.items():
        scope, opcode = scopes.get((program, op)) or scopes.get((module, op)) or ("", op)
        groups[group(scope, opcode, op)] += ns / 1e6
        rows.append({"op": op, "module": module, "scope": scope, "ms": ns / 1e6, "count": count})
    rows.sort(key=lambda r: -r["ms"])
    return {"file": path, "devices": len(devices), "total_ms": sum(groups.values()),
            "groups": groups, "top_ops": rows[:top]}


def op_events(planes) -> dict:
    """{plane: [[(op, stats, start_ns, duration_ns)] per line]} of the planes whose events are
    op executions: the device planes where any has them, else the host's."""
    found = {}
    for plane in planes:
        lines = {line.name: line for line in plane.lines}
        for line in [lines["XLA Ops"]] if "XLA Ops" in lines else lines.values():
            events = [(stats.get("hlo_op", e.name), stats, e.start_ns, e.duration_ns)
                      for e in line.events for stats in [dict(e.stats)]
                      if line.name == "XLA Ops" or "hlo_op" in stats]
            if events:
                found.setdefault(plane.name, []).append(events)
    return {k: v for k, v in found.items() if k.startswith("/device:")} or found


def exclusive_times(events):
    """(op, stats, ns) per event of one line, less the time of the events nested in it (a while
    loop's event contains its body's)."""
    events = sorted(events, key=lambda e: (e[2], -e[3]))
    own = [e[3] for e in events]
    open_ = []  # the ends of the enclosing events, and their indices
    for i, (_, _, start, duration) in enumerate(events):
        while open_ and open_[-1][0] <= start:
            open_.pop()
        if open_ and start + duration <= open_[-1][0]:
            own[open_[-1][1]] -= duration
        open_.append((start + duration, i))
    return [(op, stats, ns) for (op, stats, _, _), ns in zip(events, own)]


def hlo_scopes(data: bytes, path: str) -> dict:
    """{(program id or module name, instruction name): (metadata.op_name, opcode)} from the
    "Hlo Proto" stats of the trace's /host:metadata plane (XSpace, HloProto: tsl and xla
    protobufs)."""
    scopes = {}
    for plane in _field(data, 1):  # XSpace.planes
        if next(_field(plane, 2), b"") != b"/host:metadata":  # XPlane.name
            continue
        names = {next(_field(m, 1), 0): next(_field(m, 2), b"")  # XStatMetadata id -> name
                 for entry in _field(plane, 5) for m in _field(entry, 2)}
        for entry in _field(plane, 4):  # XPlane.event_metadata: one per program
            stats = {names.get(next(_field(s, 1), 0)): s
                     for m in _field(entry, 2) for s in _field(m, 5)}
            if b"Hlo Proto" not in stats:
                continue
            program = next((v for n in (3, 4) for v in _field(stats.get(b"program_id", b""), n)),
                           None)  # XStat.uint64_value or int64_value
            module = next(_field(next(_field(stats[b"Hlo Proto"], 6)), 1))  # bytes: HloProto
            name = next(_field(module, 1), b"").decode()
            for computation in _field(module, 3):
                for inst in _field(computation, 2):
                    op, opcode = (next(_field(inst, n)).decode() for n in (1, 2))
                    scope = next(_field(next(_field(inst, 7), b""), 2), b"").decode()
                    scopes[(program, op)] = scopes[(name, op)] = (scope, opcode)
    if not scopes:
        raise TraceError(f"no HLO modules in {path}: expected 'Hlo Proto' stats on its "
                         "'/host:metadata' plane (a trace written by jax.profiler)")
    return scopes


def _field(buf: bytes, number: int):
    """The values of protobuf field `number` in message `buf` (varints as ints, the rest as
    bytes): the few fields of XSpace and HloProto read here need no generated classes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        kind = key & 7
        if kind == 0:
            value, i = _varint(buf, i)
        elif kind in (1, 5):
            value, i = buf[i:i + (8 if kind == 1 else 4)], i + (8 if kind == 1 else 4)
        elif kind == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise TraceError(f"unexpected protobuf wire type {kind}")
        if key >> 3 == number:
            yield value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if byte < 0x80:
            return value, i


def format_summary(s: dict) -> str:
    """`summarize`'s result as the table `python -m lm.trace` prints."""
    total = s["total_ms"] or 1.0
    lines = [f"{s['file']}: {s['total_ms']:.1f} ms of XLA ops on {s['devices']} device(s)",
             f"{'group':<20} {'ms':>10} {'share':>7}"]
    lines += [f"{name:<20} {ms:10.1f} {ms / total:7.1%}" for name, ms in s["groups"].items()]
    if not s["top_ops"]:
        return "\n".join(lines)
    lines += ["", f"top {len(s['top_ops'])} ops (time summed over their executions):",
              f"{'ms':>10} {'share':>6} {'count':>6}  op  scope"]
    lines += [f"{r['ms']:10.1f} {r['ms'] / total:6.1%} {r['count']:6d}  {r['op']}  "
              f"{_clip(r['scope'] or '(none)')}" for r in s["top_ops"]]
    return "\n".join(lines)


def _clip(text: str, most: int = 120) -> str:
    return text if len(text) <= most else text[:most - 3] + "..."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm.trace", description="Where the device "
                                     "time of a profiled run goes, per model scope and op.")
    parser.add_argument("path", help="a workdir trained with train.profile_steps, its tb/ "
                        "folder, or one .xplane.pb file")
    parser.add_argument("--top", type=int, default=10, help="how many ops to list (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.top < 0:
        parser.error(f"--top must be >= 0, got {args.top}")
    try:
        summary = summarize(find_trace(args.path), args.top)
    except (TraceError, OSError) as e:
        print(f"lm.trace: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary) if args.json else format_summary(summary))


if __name__ == "__main__":
    main()

"""Start N processes of one command on this machine, as a cluster would start them on N hosts.

    python launch/local.py -n 2 --devices-per-process 2 -- python -m lm.train --config ...

Each process gets LM_COORDINATOR (localhost and a free port), LM_NUM_PROCESSES and
LM_PROCESS_ID, which `lm.distributed.initialize` reads; `--devices-per-process K` gives each
K fake CPU devices (XLA_FLAGS), `--gpus-per-process K` its own K GPUs (CUDA_VISIBLE_DEVICES).
Every output line is prefixed with its rank. If a process fails, the others are stopped
(SIGTERM, then SIGKILL after --grace seconds) and this exits with the failed process's status.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/local.py", description=__doc__.split("\n")[0])
    p.add_argument("-n", "--num-processes", type=int, required=True)
    p.add_argument("--devices-per-process", type=int, help="fake CPU devices per process")
    p.add_argument("--gpus-per-process", type=int, help="GPUs per process (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping the others")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command after --, e.g. -- python -m lm.train --config ...")
    if args.num_processes < 1:
        p.error("-n must be >= 1")
    port = args.port or free_port()
    procs = []
    for rank in range(args.num_processes):
        env = dict(os.environ, LM_COORDINATOR=f"localhost:{port}",
                   LM_NUM_PROCESSES=str(args.num_processes), LM_PROCESS_ID=str(rank),
                   PYTHONUNBUFFERED="1")
        if args.devices_per_process:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                                f"device_count={args.devices_per_process}").strip()
        if args.gpus_per_process:
            k = args.gpus_per_process
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(rank * k + i) for i in range(k))
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, bufsize=1,
                                      start_new_session=True))
    lock = threading.Lock()

    def relay(rank, stream):
        for line in stream:
            with lock:
                sys.stdout.write(f"[{rank}] {line}")
                sys.stdout.flush()

    threads = [threading.Thread(target=relay, args=(r, pr.stdout), daemon=True)
               for r, pr in enumerate(procs)]
    for t in threads:
        t.start()

    def stop_all(sig=signal.SIGTERM):
        for pr in procs:
            if pr.poll() is None:
                os.killpg(pr.pid, sig)

    # Ctrl-C / SIGTERM here goes to every process (lm.train then saves and exits 0).
    signal.signal(signal.SIGTERM, lambda *_: stop_all())
    signal.signal(signal.SIGINT, lambda *_: stop_all(signal.SIGINT))
    status = 0
    while any(pr.poll() is None for pr in procs):
        failed = [pr for pr in procs if pr.poll() not in (None, 0)]
        if failed:
            status = failed[0].returncode
            rank = procs.index(failed[0])
            with lock:
                print(f"[launch] process {rank} exited with status {status}; stopping the "
                      "others", flush=True)
            stop_all()
            deadline = time.time() + args.grace
            while time.time() < deadline and any(pr.poll() is None for pr in procs):
                time.sleep(0.1)
            stop_all(signal.SIGKILL)
            break
        time.sleep(0.1)
    for pr in procs:
        pr.wait()
    for t in threads:
        t.join(timeout=5)
    if not status:
        status = next((pr.returncode for pr in procs if pr.returncode), 0)
    return 1 if status < 0 else status  # killed by a signal: report a plain failure


if __name__ == "__main__":
    sys.exit(main())

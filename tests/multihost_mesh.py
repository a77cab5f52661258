"""One process of test_sharding's hybrid-mesh test: `python multihost_mesh.py PROCESS_ID PORT
OUT`. Two processes of 4 CPU devices each (gloo); builds (dcn_data 2) x (fsdp 4) and writes the
process index of every device of the mesh, and one sharded sum computed across both."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from lm import sharding  # noqa: E402
from lm.config import MeshConfig  # noqa: E402

mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, dcn_data=2))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P(("data", "fsdp"))),
                                           np.arange(4, dtype=np.float32) + 4 * process_id, (8,))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
with open(f"{out}/mesh{process_id}.json", "w") as f:
    json.dump({"shape": dict(mesh.shape),
               "processes": np.vectorize(lambda d: d.process_index)(mesh.devices).tolist(),
               "sum": float(total)}, f)
jax.distributed.shutdown()

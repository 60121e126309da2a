"""Multi-node over vLLM's multiprocessing backend: tensor parallelism across
two "nodes" on this machine (loopback, one process tree each, one core each).
Node 0 is our server; node 1 is our CLI's headless mode (no API, engine
workers only, our plugin loaded). Both run as the README's recipe writes them,
at the defaults (compiled, vLLM's batch sizes and encoder budget; float32 for
the parity), and the answer is the reference's."""

import subprocess
import sys

import pytest

from qwen_vl.benchmarks.harness import free_port, stop
from tests.helpers import assert_server_matches_reference, start_server


@pytest.fixture(scope="module")
def two_nodes(tiny_checkpoint, tmp_path_factory):
    logs = tmp_path_factory.mktemp("nodes")
    cluster = ["--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port())]
    with pytest.MonkeyPatch.context() as env:
        # Every connection between the nodes stays on loopback: node 0 publishes its message
        # queue at VLLM_HOST_IP (else at the address of its first network interface).
        env.setenv("VLLM_HOST_IP", "127.0.0.1")
        with open(logs / "node1.log", "wb") as out:
            node1 = subprocess.Popen(
                [sys.executable, "-m", "qwen_vl.server", "--headless", "--model", str(tiny_checkpoint),
                 "--dtype", "float32", "--seed", "0", *cluster, "--node-rank", "1",
                 "--cpu-threads-bind", "1"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            node0 = start_server(tiny_checkpoint, logs / "node0.log", *cluster, "--node-rank", "0",
                                 "--cpu-threads-bind", "0", eager=False)
        except BaseException:
            stop(node1)
            raise
    yield node0.url, node1
    node0.stop()
    stop(node1)


def test_tensor_parallel_across_two_nodes_matches_reference(two_nodes, ref_tokenizer, reference):
    url, node1 = two_nodes
    assert node1.poll() is None, "the headless node exited"
    assert_server_matches_reference(url, ref_tokenizer, reference)

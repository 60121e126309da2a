"""On CPUs, a reader of vLLM's shared-memory message queues sleeps while it
waits for the next message, instead of spinning on the cores the worker's
OpenMP threads compute on (qwen_vl/model_executor/waiting.py).

Each case runs in a child process: the change is made to vLLM's class in the
process that installs it, and must not leak into other tests."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 1.0

# A writer and a reader (a thread) on one vLLM MessageQueue: the reader reads a first message,
# then waits WAIT_S for the second, right after a read, when vLLM's reader would spin. It reports
# the CPU time its thread used while waiting, and what it read.
CHILD = textwrap.dedent("""
    import json, sys, threading, time
    from qwen_vl.model_executor import register
    from qwen_vl.model_executor.waiting import install_cpu_blocking_waits

    installed = install_cpu_blocking_waits() if sys.argv[1] == "install" else False
    if sys.argv[1] == "plugin":
        register()  # what vLLM does in every process it starts
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    writer = MessageQueue(1, 1, max_chunk_bytes=1 << 16, max_chunks=4)
    reader = MessageQueue.create_from_handle(writer.export_handle(), 0)
    out = {"installed": installed, "busy_loop_s": reader._spin_condition.busy_loop_s, "read": []}

    def read():
        reader.wait_until_ready()
        out["read"].append(reader.dequeue())
        started = time.thread_time()
        out["read"].append(reader.dequeue())
        out["wait_cpu_s"] = time.thread_time() - started

    thread = threading.Thread(target=read)
    thread.start()
    writer.wait_until_ready()
    writer.enqueue({"step": 1})
    time.sleep(float(sys.argv[2]))
    writer.enqueue({"step": 2, "after": "a pause"})
    thread.join(timeout=30)
    print("RESULT " + json.dumps(out))
""")


def run_child(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(WAIT_S)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def sleeping():
    return run_child("install")


@pytest.fixture(scope="module")
def spinning():
    return run_child("vllm")


def test_readers_sleep_on_cpus(sleeping):
    assert sleeping["installed"] is True
    assert sleeping["busy_loop_s"] == 0


def test_messages_arrive_in_order_through_a_sleeping_reader(sleeping):
    assert sleeping["read"] == [{"step": 1}, {"step": 2, "after": "a pause"}]


def test_a_sleeping_reader_uses_no_cpu_while_it_waits(sleeping, spinning):
    # vLLM's own reader spins through the whole wait (it read a message under a second ago);
    # ours sleeps until the writer's notification.
    assert spinning["busy_loop_s"] == 1 and spinning["read"] == sleeping["read"]
    assert spinning["wait_cpu_s"] > 0.5 * WAIT_S
    assert sleeping["wait_cpu_s"] < 0.1 * WAIT_S


def test_the_plugin_installs_it_in_every_vllm_process():
    assert run_child("plugin")["busy_loop_s"] == 0


def test_opt_out_keeps_vllms_spinning(monkeypatch):
    monkeypatch.setenv("QWEN_VL_CPU_WAIT", "spin")
    result = run_child("install")
    assert result["installed"] is False and result["busy_loop_s"] == 1

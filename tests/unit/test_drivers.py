"""Every driver behind the one interface, each in its own (patched) process."""
import os
import subprocess
import sys
import textwrap

import pytest

from greenq.worker import launch

DRIVERS = [d for d in os.environ.get("GREENQ_TEST_DRIVERS", "gevent,eventlet,threads,solo").split(",") if d]

EXERCISE = textwrap.dedent("""
    import sys, time, queue
    from greenq.worker.launch import patch
    driver = patch(sys.argv[1])
    assert driver.is_patched(), "not patched"
    # spawn + join + event
    ev = driver.event()
    h = driver.spawn(lambda: (driver.sleep(0.05), ev.set()))
    assert ev.wait(2) and h.join(2) and h.dead
    ev.clear(); assert not ev.is_set() and ev.wait(0.05) is False
    # queue with timeout
    q = driver.queue(); q.put(1)
    assert q.get(timeout=1) == 1
    try:
        q.get(timeout=0.05); raise SystemExit("no Empty")
    except queue.Empty:
        pass
    # timeout raises inside the current task
    class Late(Exception): pass
    t0 = time.monotonic()
    try:
        with driver.timeout(0.1, Late):
            for _ in range(100):
                driver.sleep(0.05)
        raise SystemExit("timeout did not fire")
    except Late:
        assert time.monotonic() - t0 < 2
    # kill raises the exception inside a running task
    caught = []
    def victim():
        try:
            for _ in range(200):
                driver.sleep(0.02)
        except Late:
            caught.append(1)
    h = driver.spawn(victim); driver.sleep(0.1); h.kill(Late); h.join(3)
    assert caught == [1], caught
    # blocking calls off the hub, and a real OS thread
    assert driver.run_in_thread(lambda a, b: a + b, 2, 3) == 5
    seen = []
    driver.start_os_thread(lambda: seen.append(1))
    for _ in range(100):
        if seen: break
        driver.sleep(0.01)
    assert seen
    with driver.lock():
        pass
    print("ok", driver.name)
""")


@pytest.mark.parametrize("name", DRIVERS)
def test_driver_contract(name):
    out = subprocess.run([sys.executable, "-c", EXERCISE, name], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ok {name}"


def test_pool_choice_order(tmp_path):
    ini = tmp_path / "g.ini"
    ini.write_text("[worker]\npool = eventlet\n")
    env = {"GREENQ_CONFIG": str(ini)}
    assert launch.choose_pool([], env) == ("eventlet", f"{ini}: [worker] pool")
    assert launch.choose_pool([], dict(env, GREENQ_WORKER_POOL="threads"))[0] == "threads"
    assert launch.choose_pool(["--pool", "solo"], dict(env, GREENQ_WORKER_POOL="threads"))[0] == "solo"
    assert launch.choose_pool(["-P", "gevent"], env)[0] == "gevent"
    assert launch.choose_pool(["--pool=threads"], env)[0] == "threads"
    assert launch.choose_pool(["--config", str(ini)], {})[0] == "eventlet"
    with pytest.raises(ValueError, match="unknown pool"):
        launch.choose_pool(["--pool", "greenlet"], {})


def test_unpatched_worker_refuses_to_start(tmp_path):
    code = textwrap.dedent("""
        import sys
        from greenq.worker import launch
        class Unpatched:
            name = "gevent"
            def is_patched(self): return False
        launch.patch = lambda pool: Unpatched()
        sys.exit(launch.main(["--pool", "gevent", "-A", "nothing"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2
    assert "not monkey-patched" in out.stderr and "refusing to start" in out.stderr


@pytest.mark.parametrize("name", [d for d in DRIVERS if d in ("gevent", "eventlet")])
def test_client_in_a_patched_process_keeps_blocking_calls_off_the_hub(name, tmp_path):
    code = textwrap.dedent(f"""
        from greenq.worker.launch import patch
        patch({name!r})
        from greenq import GreenQ
        app = GreenQ("web", broker="sqlite:///{tmp_path}/c.db")
        print(app.broker.driver.name, app.backend.driver.name)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [name, name]
    plain = subprocess.run([sys.executable, "-c", "from greenq import GreenQ\n"
                            f"print(GreenQ('x', broker='sqlite:///{tmp_path}/d.db').broker.driver)"],
                           capture_output=True, text=True, timeout=60)
    assert plain.stdout.strip() == "None", plain.stderr

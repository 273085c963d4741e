"""The server under hostile or careless clients (issue 18) and deploy.py's image conversions (issue 17 §3).

Each case failed on the stdlib server before the hardening: deeply nested JSON was a 500
(RecursionError), HEAD/OPTIONS/unknown methods got 501 with an HTML body, the listen backlog of 5 reset
connections of clients that open one per request, half-open connections were held forever (one thread
each), a client reset printed a traceback, an abandoned request still ran the model, and grayscale/RGBA
images were refused although deploy.py accepts them (it calls PIL's `convert("RGB")`, the truth here).
"""

import base64
import http.client
import json
import logging
import socket
import struct
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.policy.test_policy_helpers import cached_policy

INSTRUCTION = "put the carrot on the plate"


def encode(a: np.ndarray) -> dict:  # written independently of vla_jax.policy.json_numpy
    return {"__numpy__": base64.b64encode(a.tobytes()).decode(), "dtype": "|u1" if a.dtype == np.uint8 else a.dtype.str,
            "shape": list(a.shape)}


def decode(obj: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(obj["__numpy__"]), np.dtype(obj["dtype"])).reshape(obj["shape"])


def start(policy, **limits):
    from vla_jax.policy.connections import ConnectionLimits
    from vla_jax.policy.server import PolicyService, Server

    service = PolicyService(policy, max_batch=8, window_ms=5.0)
    return Server(service, "127.0.0.1", 0, ConnectionLimits(**limits)).start()


@pytest.fixture(scope="module")
def policy(llama_tokenizer_path):
    return cached_policy(str(llama_tokenizer_path))


@pytest.fixture(scope="module")
def server(policy):
    srv = start(policy)
    yield srv
    srv.shutdown()


def request(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*srv.address, timeout=60)
    try:
        conn.request(method, path, body=json.dumps(body) if isinstance(body, (dict, list)) else body,
                     headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def raw_exchange(srv, data: bytes) -> bytes:
    with socket.create_connection(srv.address, timeout=30) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_deeply_nested_json_is_a_400(server):
    deep = b"[" * 200_000 + b"]" * 200_000
    inner = "{\"a\":" * 100_000 + "1" + "}" * 100_000
    for body in (deep, json.dumps({"encoded": inner}).encode()):
        status, _, raw = request(server, "POST", "/act", body)
        assert status == 400, raw[:200]
        msg = json.loads(raw)
        assert msg["status"] == 400 and "too deeply" in msg["error"], msg
    assert request(server, "GET", "/health")[0] == 200


def test_head_options_and_unknown_methods_answer_json(server):
    status, headers, body = request(server, "HEAD", "/health")
    assert status == 200 and headers["Content-Type"] == "application/json" and body == b""
    assert int(headers["Content-Length"]) > 0  # what GET would send
    for method, path, code in [("HEAD", "/act", 405), ("HEAD", "/nope", 404), ("OPTIONS", "/act", 405),
                               ("OPTIONS", "*", 405), ("FOO", "/act", 501)]:
        status, headers, body = request(server, method, path)
        assert status == code and headers["Content-Type"] == "application/json", (method, path, status, body)
        if method != "HEAD":
            msg = json.loads(body)
            assert msg["status"] == code and msg["error"], msg
    # A malformed request line: the stdlib's own 400, as JSON too.
    head, _, body = raw_exchange(server, b"GARBAGE\r\n\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert json.loads(body)["status"] == 400
    assert request(server, "GET", "/health")[0] == 200


@pytest.mark.parametrize("shape", [(48, 40), (48, 40, 1), (48, 40, 2), (48, 40, 4)])
def test_grayscale_and_rgba_images_convert_like_pil(server, policy, shape):
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    if len(shape) == 3 and shape[-1] == 4:
        img[:8, :, 3] = 0  # transparent pixels keep their colour in PIL's RGBA -> RGB (no compositing)
    pil_input = img[..., 0] if shape[-1:] == (1,) else img
    rgb = np.asarray(Image.fromarray(pil_input).convert("RGB"))
    assert rgb.shape == (48, 40, 3)
    status, _, body = request(server, "POST", "/act", {"image": encode(img), "instruction": INSTRUCTION})
    assert status == 200, body
    np.testing.assert_array_equal(decode(json.loads(body)), policy.predict_action(rgb, INSTRUCTION))
    # Nested lists (clients without json_numpy) convert the same way.
    status, _, body = request(server, "POST", "/act", {"image": img.tolist(), "instruction": INSTRUCTION})
    assert status == 200, body
    np.testing.assert_array_equal(decode(json.loads(body)), policy.predict_action(rgb, INSTRUCTION))


def test_float_images_stay_a_400_with_the_reason(server):
    for img in (np.full((8, 8), 0.5, np.float32), np.zeros((8, 8, 4), np.float64)):
        status, _, body = request(server, "POST", "/act", {"image": encode(img), "instruction": INSTRUCTION})
        msg = json.loads(body)
        assert status == 400 and "dtype uint8" in msg["error"] and "float" in msg["error"], msg


def test_64_clients_opening_a_connection_per_request_all_served(policy):
    from vla_jax.policy import loadtest

    srv = start(policy)
    try:
        result = loadtest.run(srv.url, clients=64, requests=3, connection="new")
    finally:
        srv.shutdown()
    assert result["failures"] == 0 and result["requests"] == 192, result["failure_examples"]


def test_half_open_connections_are_closed_and_resources_return(policy):
    from vla_jax.policy import loadtest

    srv = start(policy, idle_timeout_s=1.0, read_timeout_s=2.0)
    try:
        out = {}
        for kind, limit in (("idle", 1.0), ("partial", 2.0)):
            out[kind] = loadtest.soak(srv.url, clients=8, requests=3, slow_clients=120, slow_kind=kind, hold_s=20,
                                      settle_s=20, connection="new")
            slow, load, seen = out[kind]["slow"], out[kind]["load"], out[kind]["server"]
            assert load["failures"] == 0, (kind, load["failure_examples"])  # normal clients served throughout
            assert slow["opened"] == 120 and slow["closed_by_server"] == 120, (kind, slow)
            assert limit <= slow["closed_after_s"]["min"] and slow["closed_after_s"]["max"] < limit + 10, (kind, slow)
            assert seen["during"]["open"] >= 120, (kind, seen)  # the slow connections really were held
            assert seen["after"]["threads"] == seen["before"]["threads"], (kind, seen)
            assert seen["after"]["open_fds"] == seen["before"]["open_fds"], (kind, seen)
    finally:
        srv.shutdown()


def test_connections_over_the_cap_get_a_json_503(policy):
    srv = start(policy, max_connections=4, idle_timeout_s=5.0)
    held = [socket.create_connection(srv.address, timeout=10) for _ in range(4)]
    try:
        time.sleep(0.3)
        head, _, body = raw_exchange(srv, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and json.loads(body)["status"] == 503
    finally:
        for s in held:
            s.close()
    deadline = time.time() + 10
    while time.time() < deadline and srv.httpd.open_connections:
        time.sleep(0.05)
    assert request(srv, "GET", "/health")[0] == 200
    srv.shutdown()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close -> RST
    sock.close()


def test_client_reset_is_one_log_line_not_a_traceback(server, caplog, capfd):
    caplog.set_level(logging.INFO, logger="vla_jax.policy")
    s = socket.create_connection(server.address, timeout=10)
    s.sendall(b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"{" * 100)
    time.sleep(0.3)
    _reset(s)
    deadline = time.time() + 10
    while time.time() < deadline and not any("ConnectionResetError" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    lines = [r for r in caplog.records if "ConnectionResetError" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None and "\n" not in lines[0].getMessage(), \
        [r.getMessage() for r in caplog.records]
    assert request(server, "GET", "/health")[0] == 200


def test_abandoned_request_is_cancelled_before_the_model_runs(policy, caplog):
    """A blocks the batch worker; B queues, then B's client resets: B must never reach the model."""
    caplog.set_level(logging.INFO, logger="vla_jax.policy")
    srv = start(policy)
    service = srv.service
    release, started, ran = threading.Event(), threading.Event(), []
    real = service.batcher.run_batch

    def gated(examples):
        ran.append([ex.prompt for ex in examples])
        started.set()
        assert release.wait(60)
        return real(examples)

    service.batcher.run_batch = gated
    img = np.zeros((56, 56, 3), np.uint8)
    body_a = json.dumps({"image": encode(img), "instruction": "open the drawer"}).encode()
    body_b = json.dumps({"image": encode(img), "instruction": "close the drawer now"}).encode()
    result = {}
    thread_a = threading.Thread(target=lambda: result.update(a=request(srv, "POST", "/act", body_a)))
    try:
        thread_a.start()
        assert started.wait(60)
        b = socket.create_connection(srv.address, timeout=10)
        b.sendall(b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body_b)).encode() + b"\r\n\r\n" + body_b)
        deadline = time.time() + 10
        while time.time() < deadline and service.batcher.waiting == 0:
            time.sleep(0.01)
        assert service.batcher.waiting == 1  # B is queued behind A
        _reset(b)
        deadline = time.time() + 10
        while time.time() < deadline and service.health()["cancelled"] == 0:
            time.sleep(0.02)
        release.set()
        thread_a.join(60)
        time.sleep(0.3)  # the worker would have taken B by now
        assert result["a"][0] == 200
        assert len(ran) == 1 and len(ran[0]) == 1, ran  # only A's batch ran
        assert service.health()["cancelled"] == 1
        assert any("left before its action was ready" in r.getMessage() for r in caplog.records)
    finally:
        release.set()
        srv.shutdown()


def test_bad_connection_flags_name_the_flag(capsys):
    from vla_jax.serve import main

    for flag, expected in (("--idle_timeout_s=0", "--idle_timeout_s must be > 0"),
                           ("--max_connections=0", "--max_connections must be >= 1"),
                           ("--prompt_len=0", "--prompt_len must be >= 1")):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint=does-not-matter", flag])
        assert e.value.code == 2 and expected in capsys.readouterr().err, flag

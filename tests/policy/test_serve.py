"""REST server on loopback: OpenVLA deploy payloads (plain and "encoded") give predict_action's
actions; every bad request gets a 4xx JSON error and the server keeps serving.

The wire format is built and read here independently of vla_jax.policy.json_numpy
(base64 of the raw bytes + numpy descr + shape, VERIFIED_FACTS.md)."""

import base64
import http.client
import json

import numpy as np
import pytest

from tests.policy.test_policy_helpers import cached_policy, random_images

MAX_BODY = 1 << 20


def encode(a: np.ndarray) -> dict:
    return {"__numpy__": base64.b64encode(a.tobytes()).decode(), "dtype": a.dtype.str if a.dtype.itemsize > 1
            else "|" + a.dtype.str[1:], "shape": list(a.shape)}


def decode(obj: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(obj["__numpy__"]), np.dtype(obj["dtype"])).reshape(obj["shape"])


@pytest.fixture(scope="module")
def served(llama_tokenizer_path):
    from vla_jax.policy.server import PolicyService, Server

    policy = cached_policy(str(llama_tokenizer_path))
    server = Server(PolicyService(policy, max_batch=8, window_ms=5.0, max_body=MAX_BODY), "127.0.0.1", 0).start()
    yield policy, server
    server.shutdown()


def request(server, method: str, path: str, body=None, headers=None):
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_health_and_localhost_default(served):
    _, server = served
    status, body = request(server, "GET", "/health")
    info = json.loads(body)
    assert status == 200 and info["status"] == "ok"
    assert info["model"]["unnorm_keys"] == ["bridge_dataset"] and info["model"]["image_size"] == 56
    assert server.address[0] == "127.0.0.1"
    from vla_jax.serve import build_parser

    assert build_parser().parse_args(["--checkpoint=x"]).host == "127.0.0.1"


def test_valid_requests_return_predict_action(served):
    policy, server = served
    img_a, img_b = random_images(2, seed=11)
    img_c = np.random.default_rng(12).integers(0, 256, (48, 72, 3), dtype=np.uint8)
    cases = [(img_a, "put carrot on plate", {}), (img_b, "open the drawer", {"unnorm_key": "bridge_dataset"}),
             (img_c, "stack the cups", {"unnorm_key": None})]
    for img, instr, extra in cases:
        expected = policy.predict_action(img, instr)
        status, body = request(server, "POST", "/act", {"image": encode(img), "instruction": instr, **extra})
        assert status == 200, body
        got = decode(json.loads(body))
        assert got.dtype == np.float64 and got.shape == (7,)
        np.testing.assert_array_equal(got, expected)
        # deploy.py's double-encoded form: a JSON string in, a JSON string holding the array out.
        inner = json.dumps({"image": encode(img), "instruction": instr, **extra})
        status, body = request(server, "POST", "/act", {"encoded": inner})
        assert status == 200, body
        np.testing.assert_array_equal(decode(json.loads(json.loads(body))), expected)
    # Clients without json_numpy may send nested lists of ints.
    status, body = request(server, "POST", "/act", {"image": img_a.tolist(), "instruction": "put carrot on plate"})
    assert status == 200
    np.testing.assert_array_equal(decode(json.loads(body)), policy.predict_action(img_a, "put carrot on plate"))


def _bad_requests():
    img = random_images(1, seed=13)[0]
    good = {"image": encode(img), "instruction": "open the drawer"}
    flt = encode(img.astype(np.float32))
    short = dict(encode(img), __numpy__=base64.b64encode(b"0123456789").decode())
    return [
        ("garbage json", "POST", "/act", b"{not json", 400, "not valid JSON"),
        ("binary garbage", "POST", "/act", b"\xff\xfe\x00\x01", 400, "not valid JSON"),
        ("json list", "POST", "/act", [1, 2], 400, "payload must be a JSON object"),
        ("missing image", "POST", "/act", {"instruction": "x"}, 400, r"missing field\(s\) \['image'\]"),
        ("missing instruction", "POST", "/act", {"image": good["image"]}, 400, r"\['instruction'\]"),
        ("empty instruction", "POST", "/act", dict(good, instruction="  "), 400, "'instruction' is empty"),
        ("instruction not str", "POST", "/act", dict(good, instruction=5), 400, "'instruction' must be a string"),
        ("float image", "POST", "/act", dict(good, image=flt), 400, "dtype uint8"),
        # Grayscale [H, W] and RGBA [H, W, 4] are accepted since issue 17 (deploy.py converts them with PIL):
        # tests/policy/test_serve_robustness.py. Shapes PIL cannot read stay errors.
        ("5-channel image", "POST", "/act", dict(good, image=encode(np.zeros((8, 8, 5), np.uint8))), 400,
         r"shape \[H, W, 3\].*\[8, 8, 5\]"),
        ("4-D image", "POST", "/act", dict(good, image=encode(np.zeros((1, 8, 8, 3), np.uint8))), 400,
         r"\[1, 8, 8, 3\]"),
        ("CHW image", "POST", "/act", dict(good, image=encode(img.transpose(2, 0, 1).copy())), 400, r"\[3, 64, 64\]"),
        ("bytes vs shape", "POST", "/act", dict(good, image=short), 400, "holds 10 bytes"),
        ("not base64", "POST", "/act", dict(good, image=dict(good["image"], __numpy__="***")), 400, "base64"),
        ("bad dtype", "POST", "/act", dict(good, image=dict(good["image"], dtype="nope")), 400, "not a numpy dtype"),
        ("image string", "POST", "/act", dict(good, image="abc"), 400, "must be a json_numpy array"),
        ("float list", "POST", "/act", dict(good, image=[[[0.5, 0.5, 0.5]]]), 400, "integers in"),
        ("huge side", "POST", "/act", dict(good, image=encode(np.zeros((5000, 1, 3), np.uint8))), 400, "each side"),
        ("unknown key", "POST", "/act", dict(good, unnorm_key="bridge_orig"), 400,
         r"unknown unnorm_key 'bridge_orig'.*\['bridge_dataset'\]"),
        ("key not str", "POST", "/act", dict(good, unnorm_key=3), 400, "'unnorm_key' must be a string"),
        ("encoded + more", "POST", "/act", {"encoded": json.dumps(good), "x": 1}, 400, "only key"),
        ("encoded garbage", "POST", "/act", {"encoded": "{oops"}, 400, "'encoded' is not valid JSON"),
        ("encoded not str", "POST", "/act", {"encoded": good}, 400, "'encoded' must be a JSON string"),
        ("too large", "POST", "/act", b"x" * (3 * MAX_BODY), 413, "exceeds"),
        ("GET /act", "GET", "/act", None, 405, "use POST"),
        ("unknown path", "POST", "/predict", good, 404, "unknown path"),
        ("unknown GET", "GET", "/", None, 404, "unknown path"),
    ]


def test_bad_requests_get_json_errors_and_the_server_survives(served):
    import re

    policy, server = served
    for name, method, path, body, status, pattern in _bad_requests():
        got, raw = request(server, method, path, body)
        assert got == status, (name, got, raw[:300])
        msg = json.loads(raw)
        assert msg["status"] == status and re.search(pattern, msg["error"]), (name, msg)
        assert request(server, "GET", "/health")[0] == 200, f"server down after {name}"
    img = random_images(1, seed=14)[0]
    status, body = request(server, "POST", "/act", {"image": encode(img), "instruction": "stack the cups"})
    assert status == 200
    np.testing.assert_array_equal(decode(json.loads(body)), policy.predict_action(img, "stack the cups"))


def test_missing_content_length_is_411(served):
    _, server = served
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/act")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    conn.close()


def test_json_numpy_codec_round_trips_like_the_package():
    from vla_jax.policy import json_numpy

    for a in [np.arange(6, dtype=np.uint8).reshape(1, 2, 3), np.array([0.1, -2.5]), np.float32(3.5),
              np.arange(4, dtype=">i4"), np.zeros((0, 3), np.float32)]:
        enc = json.loads(json_numpy.dumps(a))
        assert enc["dtype"] == np.lib.format.dtype_to_descr(np.asarray(a).dtype)
        back = json_numpy.loads(json.dumps(enc))
        np.testing.assert_array_equal(back, a)
        assert np.asarray(back).dtype == np.asarray(a).dtype
    assert json.loads(json_numpy.dumps(np.zeros((2, 2, 3), np.uint8)))["dtype"] == "|u1"
    assert json_numpy.dumps(np.float64(0.5)) == "0.5"  # a float subclass: plain JSON, as with json_numpy
    np.testing.assert_array_equal(json_numpy.loads(json.dumps(encode(np.arange(3.0)))), np.arange(3.0))

"""--score http=URL and reward_server.py on loopback: the server's scores are the in-process scorer's on the same
8-bit images; a server that is down, slow or answers garbage is one line naming the URL; an online run whose server
fails stops with its last checkpoint kept; evaluate.py and relabel.py take it too."""
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import dpo
import relabel
import reward
import reward_server
import tiny
from test_online import PROMPTS, flags


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


@pytest.fixture
def serve():
    """serve(scorer or handler class) -> the URL of a loopback server (port picked by the OS), stopped after."""
    servers = []

    def start(what):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), what) if isinstance(what, type) else \
            reward_server.server(what, "127.0.0.1", 0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/"
    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_the_server_gives_the_in_process_scores(serve, clip_dir):
    folder, _ = clip_dir
    local = reward.load("pickscore", folder)
    url = serve(local)
    remote = reward.load_all([reward.parse_spec(f"http={url}")])["http"]
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a dog", "", "a red cube", "a photo of a cat"]
    as_png = (images * 255).round() / 255  # what the PNG carries: the 8-bit image, as a sample is saved
    want = local(as_png, prompts)
    got = remote(images, prompts)
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(want, want[0].expand(5))  # the scores tell the images apart
    mixed = remote(torch.nn.functional.interpolate(images[:2], size=28), prompts[:2])  # another size, another call
    torch.testing.assert_close(mixed, local((torch.nn.functional.interpolate(images[:2], size=28) * 255).round() / 255,
                                            prompts[:2]), rtol=1e-6, atol=1e-6)


class Garbage(BaseHTTPRequestHandler):
    def do_POST(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"<html>hello</html>")

    def log_message(self, *a):
        pass


class Slow(Garbage):
    def do_POST(self):
        time.sleep(1.0)
        try:  # the client gave up long ago
            super().do_POST()
        except OSError:
            pass


class WrongCount(Garbage):
    def do_POST(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(json.dumps({"scores": [1.0]}).encode())


class Refuses(Garbage):
    def do_POST(self):
        self.send_response(400)
        self.end_headers()
        self.wfile.write(b'{"error": "bad request: images[0] is not a base64-encoded image"}')


def test_a_server_down_slow_or_answering_garbage_is_one_line(serve):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    down = f"http://127.0.0.1:{s.getsockname()[1]}/"  # bound, never listening: refused
    s.close()
    images, prompts = torch.rand(2, 3, 8, 8), ["a", "b"]
    cases = [(down + ",retries=2", "did not answer", "2 tries"), (serve(Slow) + ",timeout=0.2,retries=1",
                                                                 "did not answer", "timed out"),
             (serve(Garbage), "answered b'<html>hello</html>'", "not JSON"), (serve(WrongCount), "gave 1 scores",
                                                                              "for 2 images"),
             (serve(Refuses), "answered HTTP 400", "not a base64-encoded image")]
    for spec, *said in cases:
        scorer = reward.load_all([reward.parse_spec("http=" + spec)])["http"]
        with pytest.raises(ValueError) as e:
            scorer(images, prompts)
        msg = str(e.value)
        assert msg.startswith(f"the reward server {spec.split(',')[0]} ") and "\n" not in msg, msg
        assert all(s in msg for s in said), msg
    with pytest.raises(ValueError, match="needs an http:// or https:// URL"):
        reward.load_all([reward.parse_spec("http=localhost:8000")])


def test_an_online_run_stops_when_its_server_fails(serve, tmp_path, sdxl_dir, prompt_file, capsys, one_thread):
    """Scores from the server until it breaks: one line naming it, the last checkpoint kept."""
    import toy
    calls = []

    def area(images, prompts):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("the scorer broke")
        return toy.area(images, prompts)
    url = serve(area)
    out = tmp_path / "run"
    argv = flags(out, sdxl_dir, prompt_file, "--ckpt_every", "1", steps=4)
    argv[argv.index("area")] = f"http={url},retries=1"
    err = tiny.cli_error(dpo.main, argv, capsys)
    assert err.startswith(f"error: the reward server {url} answered HTTP 500: ") and "the scorer broke" in err, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] >= 1


def test_relabel_takes_a_server(serve, tmp_path, jsonl):
    import toy
    url = serve(toy.area)
    relabel.main([jsonl, "--score", f"http={url}", "--out", str(tmp_path / "a.jsonl")])
    relabel.main([jsonl, "--score", "area", "--out", str(tmp_path / "b.jsonl")])
    a = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    b = [json.loads(line) for line in open(tmp_path / "b.jsonl")]
    assert [x["label_0"] for x in a] == [x["label_0"] for x in b] and os.path.getsize(tmp_path / "a.jsonl") > 0

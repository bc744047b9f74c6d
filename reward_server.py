"""A reward server: one of reward.py's scorers behind HTTP, in the protocol that `--score http=URL` speaks, so that a
reward with other dependencies (a GenEval detector, an OCR model, a VLM judge) runs in its own environment and any
tool here (dpo.py --online, evaluate.py, relabel.py) reaches it the same way. The protocol (docs/evaluation.md):

    POST URL  {"prompts": [str, ...], "images": [base64 PNG, ...]}  ->  200 {"scores": [float, ...]}, one per image
    anything wrong with the request                                 ->  400 {"error": "..."}

    python reward_server.py --score pickscore=DIR [--host 127.0.0.1] [--port 8000] [--device cuda]
    python dpo.py --online ... --score http=http://127.0.0.1:8000/
"""
import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image

import cli
import reward
from weights import CheckpointError


def decode(images) -> list:
    """base64 PNG strings -> [3, H, W] float32 tensors in [0, 1] (what the scorers take)."""
    out = []
    for k, s in enumerate(images):
        try:
            img = Image.open(io.BytesIO(base64.b64decode(s, validate=True))).convert("RGB")
        except Exception:
            raise ValueError(f"images[{k}] is not a base64-encoded image") from None
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1))
    return out


def score(scorer, prompts, images) -> list:
    """One score per image, in order; images of one size are scored in one call."""
    scores = [None] * len(images)
    sizes = {}
    for k, x in enumerate(images):
        sizes.setdefault(tuple(x.shape), []).append(k)
    for ks in sizes.values():
        with torch.no_grad():
            out = scorer(torch.stack([images[k] for k in ks]), [prompts[k] for k in ks])
        for k, v in zip(ks, out.float().cpu().tolist()):
            scores[k] = v
    return scores


def server(scorer, host="127.0.0.1", port=8000, log=None):
    """A ThreadingHTTPServer answering the protocol with scorer (one request scored at a time); port 0 picks one."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                prompts, images = body["prompts"], body["images"]
                if not (isinstance(prompts, list) and isinstance(images, list) and len(prompts) == len(images)
                        and all(isinstance(p, str) for p in prompts)):
                    raise ValueError("prompts and images must be lists of the same length (prompts: strings)")
                pixels = decode(images)
            except (ValueError, KeyError, TypeError) as e:
                return self.answer(400, {"error": f"bad request: {e}"})
            try:
                with lock:
                    scores = score(scorer, prompts, pixels)
            except Exception as e:  # the scorer failed: said to the client, which retries, then stops
                return self.answer(500, {"error": f"the scorer failed: {type(e).__name__}: {e}"})
            self.answer(200, {"scores": scores})

        def answer(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            if log is not None:
                log(fmt % args)

    return ThreadingHTTPServer((host, port), Handler)


def main(argv=None):
    p = cli.Parser(description="Serve one of reward.py's scorers over HTTP (the protocol of --score http=URL).")
    p.add_argument("--score", required=True, metavar="KIND[=PATH][,OPTION=VALUE...]", help="the scorer, as "
                   "dpo.py's --score (pickscore=DIR, clip=DIR, hps=FILE.pt, aesthetic=DIR,head=FILE, area)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    specs = reward.parse_flags(p, [args.score])
    if specs[0][0] == "http":
        p.error("--score http=URL is a client of a server like this one: serve pickscore, clip, hps, aesthetic or area")

    def run(args):
        scorer = reward.load_all(specs, device=args.device)[specs[0][0]]
        srv = server(scorer, args.host, args.port, log=print)
        print(f"serving --score {args.score} at http://{args.host}:{srv.server_address[1]}/ (Ctrl-C stops)", flush=True)
        srv.serve_forever()
    cli.guard(run, args, (CheckpointError, ValueError, OSError))


if __name__ == "__main__":
    main()

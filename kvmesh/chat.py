"""`kvmesh chat`: an interactive, streaming conversation with the mesh through the SDK."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc

from kvmesh.client import Client


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmesh chat", description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:50051", help="router gRPC address")
    parser.add_argument("--system", default="", help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--model", default="")
    args = parser.parse_args(argv)
    history = [{"role": "system", "content": args.system}] if args.system else []
    with Client(args.address) as client:
        print("kvmesh chat — empty line or Ctrl-D to quit", flush=True)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            history.append({"role": "user", "content": line})
            reply = []
            try:
                for chunk in client.stream(messages=history, model=args.model, max_tokens=args.max_tokens,
                                           temperature=args.temperature):  # fmt: skip
                    print(chunk.text, end="", flush=True)
                    reply.append(chunk.text)
            except grpc.RpcError as exc:
                print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
                history.pop()
                continue
            print(flush=True)
            history.append({"role": "assistant", "content": "".join(reply)})
    return 0

"""Open-loop streaming load generator (runs as its own process).

``python -m pdroute.bench.loadgen --plan PLAN.json --url BASE --out RECORDS.json``
sends every planned request (:class:`pdroute.bench.workloads.BenchRequest`) at its
planned offset, whether or not earlier ones finished (open loop: an overloaded
arm shows queueing, it is never offered less load), as a streaming
``/v1/completions`` with ``stream_options.include_usage`` and ``ignore_eos`` (every
arm generates exactly ``max_tokens``). Per request it records status, TTFT, the
gaps between content chunks (ITL), end-to-end latency, output tokens (from the
usage chunk) and the serving endpoint (``x-inference-served-by``).

In-flight requests are bounded (``--concurrency``): past the bound a request waits
for a slot, and its send lag (actual - planned) is recorded, so a client-side
bottleneck is visible in the results rather than hidden. It runs in its own
process (uvloop when available) so it does not share an interpreter with the
benchmark's orchestration, and prints one updating progress line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from pdroute.bench.stats import RequestRecord
from pdroute.bench.workloads import BenchRequest

SERVED_BY = "x-inference-served-by"


class Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.sent = 0
        self.done = 0
        self.failed = 0
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def show(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < (0.5 if self.tty else 10.0):
            return
        self._last = now
        line = (
            f"[{self.label}] sent {self.sent}/{self.total}  done {self.done}  "
            f"failed {self.failed}  in flight {self.sent - self.done}"
        )
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    req: BenchRequest,
    *,
    t0: float,
    timeout_s: float,
) -> RequestRecord:
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.0,
    }
    rec = RequestRecord(
        idx=req.idx,
        planned_s=req.at_s,
        sent_s=time.monotonic() - t0,
        status=0,
        ok=False,
        phase=req.phase,
        group=req.group,
    )
    start = time.monotonic()
    last: float | None = None
    chunks = 0
    done = False
    try:
        async with session.post(
            url,
            data=orjson.dumps(body),
            headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            rec.status = resp.status
            rec.served_by = resp.headers.get(SERVED_BY)
            if resp.status != 200:
                rec.error = (await resp.read())[:300].decode("utf-8", "replace")
                rec.e2e_s = time.monotonic() - start
                return rec
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    rec.error = f"bad SSE data: {data[:100]!r}"
                    continue
                if not isinstance(obj, dict):
                    continue
                if "error" in obj:
                    rec.error = str(obj["error"])[:300]
                    continue
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    rec.output_tokens = int(usage.get("completion_tokens") or 0)
                    rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                choices = obj.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("delta")):
                    now = time.monotonic()
                    if last is None:
                        rec.ttft_s = now - start
                    else:
                        rec.itl_s.append(round(now - last, 6))
                    last = now
                    chunks += 1
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
    rec.e2e_s = time.monotonic() - start
    if not rec.output_tokens:
        rec.output_tokens = chunks
    rec.ok = rec.status == 200 and done and rec.error is None and rec.ttft_s is not None
    return rec


async def drive(
    plan: list[BenchRequest],
    base_url: str,
    model: str,
    *,
    concurrency: int = 512,
    timeout_s: float = 300.0,
    label: str = "bench",
) -> list[RequestRecord]:
    url = base_url.rstrip("/") + "/completions"
    sem = asyncio.Semaphore(concurrency)
    prog = Progress(label, len(plan))
    records: list[RequestRecord] = []
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.monotonic()

        async def task(req: BenchRequest) -> None:
            async with sem:
                prog.sent += 1
                rec = await one_request(session, url, model, req, t0=t0, timeout_s=timeout_s)
            records.append(rec)
            prog.done += 1
            if not rec.ok:
                prog.failed += 1

        tasks: list[asyncio.Task[None]] = []
        for req in plan:
            delay = req.at_s - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(task(req)))
            prog.show()
        while any(not t.done() for t in tasks):
            prog.show()
            await asyncio.wait(tasks, timeout=0.5)
        for t in tasks:
            t.result()
    prog.show(final=True)
    records.sort(key=lambda r: r.idx)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdroute.bench.loadgen")
    p.add_argument("--plan", type=Path, required=True, help="JSON list of planned requests")
    p.add_argument("--url", required=True, help="OpenAI base URL, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--model", default="sim-model")
    p.add_argument("--out", type=Path, required=True, help="where the records go (JSON)")
    p.add_argument("--concurrency", type=int, default=512)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--label", default="bench")
    a = p.parse_args(argv)
    plan = [BenchRequest.from_json(d) for d in orjson.loads(a.plan.read_bytes())]
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    records = runner(
        drive(
            plan,
            a.url,
            a.model,
            concurrency=a.concurrency,
            timeout_s=a.timeout,
            label=a.label,
        )
    )
    a.out.write_bytes(orjson.dumps([r.to_json() for r in records]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

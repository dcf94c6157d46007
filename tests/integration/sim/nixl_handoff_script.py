"""Run by test_nixl_handoff.py in a subprocess that can import ``nixl``: one P/D handoff.

Prints one JSON line: HTTP statuses, how many pulls used NIXL, bytes moved, texts.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import orjson

from pdroute.protocol.kv_transfer import PREFILL_REQUEST_PARAMS
from pdroute.sim.config import SimConfig
from pdroute.sim.fleet import SimFleet
from pdroute.sim.latency import get_profile

PROMPT = "NIXL moves the prefill server's KV blocks to the decode server. " * 8


async def main() -> dict[str, object]:
    def cfg(role: str) -> SimConfig:
        return SimConfig(
            model="m",
            profile=get_profile("fast"),
            block_size=16,
            num_blocks=128,
            role=role,
            kv_transport="nixl",
            kv_bytes_per_block=8192,
        )

    async with (
        SimFleet(cfg("prefill")) as p,
        SimFleet(cfg("decode")) as d,
        aiohttp.ClientSession() as s,
    ):
        body = {
            "prompt": PROMPT,
            "max_tokens": 1,
            "kv_transfer_params": dict(PREFILL_REQUEST_PARAMS),
        }
        async with s.post(f"http://{p.addresses[0]}/v1/completions", json=body) as r:
            pre = await r.json()
        ktp = pre["kv_transfer_params"]
        body = {"prompt": PROMPT, "max_tokens": 4, "kv_transfer_params": ktp}
        async with s.post(f"http://{d.addresses[0]}/v1/completions", json=body) as r:
            dec_status = r.status
            dec = await r.json()
        async with s.post(
            f"http://{p.addresses[0]}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}
        ) as r:
            single = await r.json()
        srv = d.servers[0]
        return {
            "decode_status": dec_status,
            "nixl_reads": srv.nixl_reads,
            "bytes": srv.stats.nixl.bytes_transferred.sum,
            "blocks": len(ktp["remote_block_ids"][0]),
            "external": srv.stats.prompt_by_source["external_kv_transfer"],
            "prompt_tokens": dec.get("usage", {}).get("prompt_tokens"),
            "same_text": dec["choices"][0]["text"] == single["choices"][0]["text"],
            "lease_released": not p.servers[0].engine.leases,
        }


if __name__ == "__main__":
    sys.stdout.write(orjson.dumps(asyncio.run(main())).decode() + "\n")

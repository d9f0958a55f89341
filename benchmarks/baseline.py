"""The short script a user would write instead of imgedit: the benchmark's yardstick.

asyncio + httpx + a semaphore + boto3: read the manifest with the csv module, send each row
to the edit API with at most `concurrency` requests in flight, and put the decoded image in
S3. No retries, no sidecars, no results table, no resume, no budget, no validation.

Two choices make it the strongest short script rather than the most naive one: the
connection pool is as large as the concurrency (httpx keeps only 20 idle connections by
default), and the semaphore covers the API call only, so S3 writes do not hold API slots.

    python -m benchmarks.baseline MANIFEST --api-base URL --bucket B --prefix P -c 64
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
from pathlib import Path

import boto3
import httpx
from botocore.config import Config


async def main(
    manifest: str,
    api_base: str,
    bucket: str,
    prefix: str,
    concurrency: int,
    endpoint_url: str | None = None,
    model: str = "p-image-edit",
) -> int:
    """Edit every row; returns how many images were stored. Any failure ends the script."""
    s3 = boto3.client(
        "s3", endpoint_url=endpoint_url, config=Config(max_pool_connections=concurrency)
    )
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def edit(row: dict[str, str]) -> None:
            async with semaphore:
                image = Path(row["image"]).read_bytes()
                response = await client.post(
                    f"{api_base}/images/edits",
                    data={
                        "model": model,
                        "prompt": row["prompt"],
                        "seed": row["seed"],
                        "size": row["size"],
                        "output_format": row["output_format"],
                        "response_format": "b64_json",
                    },
                    files={"image": ("image.jpg", image, "image/jpeg")},
                )
            response.raise_for_status()
            data = base64.b64decode(response.json()["data"][0]["b64_json"])
            key = f"{prefix}/{row['id']}.{row['output_format']}"
            await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=key, Body=data)

        await asyncio.gather(*(edit(row) for row in rows))
    return len(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest")
    parser.add_argument("--api-base", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="baseline")
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--endpoint-url")
    a = parser.parse_args()
    n = asyncio.run(main(a.manifest, a.api_base, a.bucket, a.prefix, a.concurrency, a.endpoint_url))
    print(f"{n} images stored under s3://{a.bucket}/{a.prefix}/")

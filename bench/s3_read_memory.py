"""Benchmark: reading a whole checkpoint shard from S3 into a writable buffer (what a full-shard
restore and `engine.load` do), the old way and the new, side by side on one S3 server.

Prints ONE JSON line. Run from the repository root:
    python bench/s3_read_memory.py            # a 256 MB object, 5 rounds
    python bench/s3_read_memory.py --quick    # 64 MB, 3 rounds

- before: boto3's download_fileobj into a BytesIO, getvalue(), then bytearray() of that (the path
  S3Storage.read_private took until this change).
- after: S3Storage.read_private: a first ranged GET that also gives the size, one buffer of that
  size, the other parts fetched in parallel into their places.
- crt (when awscrt is installed: pip install 'boto3[crt]'): boto3's CRT transfer client
  (download_fileobj with preferred_transfer_client="crt") into a BytesIO, then bytearray(), to see
  whether the CRT would pay for its dependency.
Peak memory is tracemalloc's peak over the read (Python allocations: the buffers and the transfer's
own chunks), as a multiple of the object's size, measured in a round of its own; time is wall-clock
seconds of a round without tracemalloc. Rounds alternate the methods; medians are quoted.
The server is `rclone serve s3` on 127.0.0.1 (tests/s3server.py): a loopback, so time measures the
client's work more than a network.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, median, note  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    size_mb, rounds = (64, 3) if args.quick else (256, 5)

    from boto3.s3.transfer import TransferConfig
    from s3server import S3Server

    from stalwart.checkpointing.s3 import S3Storage

    server = S3Server()
    server.start()
    try:
        storage = S3Storage(f"s3://{server.bucket}/bench", server.options)
        storage.write("blob", os.urandom(size_mb << 20))
        key = storage._key("blob")
        config = storage._transfer_config()

        def before() -> bytearray:
            buf = io.BytesIO()
            storage.client.download_fileobj(storage.bucket, key, buf, Config=config)
            return bytearray(buf.getvalue())

        def after() -> bytearray:
            return storage.read_private("blob")

        methods = {"before": before, "after": after}
        crt_problem = "awscrt is not installed"
        try:
            import awscrt  # noqa: F401 - only whether it is there

            crt_config = TransferConfig(preferred_transfer_client="crt", max_concurrency=config.max_concurrency,
                                        multipart_chunksize=config.multipart_chunksize)

            def crt() -> bytearray:
                buf = io.BytesIO()
                storage.client.download_fileobj(storage.bucket, key, buf, Config=crt_config)
                return bytearray(buf.getvalue())

            try:
                crt()
                methods["crt"] = crt
            except Exception as exc:  # noqa: BLE001 - what the CRT does with this endpoint is the finding
                crt_problem = f"{type(exc).__name__}: {exc}"
                note(f"the CRT transfer client cannot read from this server: {crt_problem}")
        except ImportError:
            note("awscrt is not installed: the CRT is left out (pip install 'boto3[crt]' to include it)")

        size = size_mb << 20
        seconds: dict[str, list] = {m: [] for m in methods}
        peaks: dict[str, list] = {m: [] for m in methods}
        for i in range(rounds):
            for name in (list(methods) if i % 2 == 0 else list(reversed(methods))):
                t0 = time.perf_counter()
                blob = methods[name]()
                seconds[name].append(time.perf_counter() - t0)
                assert len(blob) == size
                del blob
                tracemalloc.start()
                blob = methods[name]()
                peaks[name].append(tracemalloc.get_traced_memory()[1] / size)
                tracemalloc.stop()
                del blob
            note(f"round {i + 1}: " + ", ".join(f"{m} {seconds[m][-1]:.2f} s {peaks[m][-1]:.2f}x" for m in methods))
        line = {"bench": "s3_read_memory", "object_mb": size_mb, "rounds": rounds,
                "peak_x": {m: median(peaks[m]) for m in methods},
                "seconds": {m: median(seconds[m]) for m in methods},
                "peak_ratio_after_before": median(peaks["after"]) / median(peaks["before"]),
                "time_ratio_after_before": median(seconds["after"]) / median(seconds["before"])}
        if "crt" in methods:
            line["time_ratio_crt_before"] = median(seconds["crt"]) / median(seconds["before"])
        else:
            line["crt"] = crt_problem
        emit(line)
    finally:
        server.close()


if __name__ == "__main__":
    main()

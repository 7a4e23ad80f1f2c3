"""Serving many tenants: the routed forward against a merged model and a per-adapter split, and a loopback load test.

1. In process on ``--device``, fp32, ``--batch`` images from each of ``--tenant-counts`` lora-pe
   tenants (image i from tenant i mod k; ImageNet ViT-Ti/16 at ``--size``; adapters with random
   tensors of the real shapes):
   routed (one forward, per-sample adapters) vs one merged model on the same batch (the
   ceiling: one client, no routing) vs the batch split per adapter (PEFT's ``adapter_names``
   way: one forward per tenant). Interleaved repeats, median seconds per batch.
   ``--host-cost``: routed against merged again through ViT-Ti's 12 blocks at width 8 on one 16x16
   patch: every operator is dispatched (on a GPU, launched) as at full size, with next to no
   arithmetic, so a pass's time is the host's. On a GPU, a serving pass of a few images is bound by
   this rather than by the device; on a CPU it is what routing adds in Python and dispatch. Beside the
   times, the aten operators a pass dispatches (profiler events, nested ones included): the same on any
   device, and on a GPU a bound on its kernel launches. On CUDA, also whether a routed pass made the host
   wait for the GPU (sync debug mode).
2. Loopback: ``ppvit serve`` on 127.0.0.1 with ``--tenants`` registered lora-pe adapters,
   ``--clients`` concurrent asyncio clients sending one-image requests for ``--seconds``:
   requests/s, p50/p99 latency, errors.
3. Memory: bytes per resident adapter, adapters per GiB, and the same arithmetic for ViT-B/16.

Usage:
    python benchmarks/bench_serve.py [--weights $PPVIT_WEIGHTS] [--size 112] [--batch 64] [--repeats 5]
    python benchmarks/bench_serve.py --device cuda --size 224 --tenant-counts 1,16,64   # on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import io
import math
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn

from ppvit._io import file_sha256
from ppvit.models.adapters import AdapterMeta, save_adapter
from ppvit.models.backbones import create_backbone
from ppvit.models.graphs import cuda_graph
from ppvit.models.methods import apply_method, count_params, merge_adapters, method_config
from ppvit.models.routing import RoutedViT, routed_adapter
from ppvit.models.weights import WEIGHTS_ENV
from ppvit.serve.app import ServeConfig
from ppvit.serve.server import uvicorn_config
from ppvit.serve.tenants import TenantStore

MODEL = "vit_tiny_patch16_224"


def make_adapter(
    weights: str | None, size: int, seed: int, model_name: str = MODEL, num_classes: int = 10, **kwargs: int
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A lora-pe model with random trained tensors (LoRA B non-zero, so the update costs what it costs);
    ``kwargs``: timm's model arguments beside the input size."""
    torch.manual_seed(seed)
    backbone = create_backbone(model_name, num_classes=num_classes, weights=weights, img_size=size, **kwargs)
    model = apply_method(backbone, method_config("lora-pe"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def peft_mixed(weights: str | None, size: int, tenants: int, device: torch.device, **kwargs: int) -> torch.nn.Module:
    """PEFT's own way to serve a batch mixing adapters: one ``PeftModel`` holding ``tenants`` adapters of lora-pe's
    shape (LoRA on the fused qkv at rank 2r = 8, the q and v updates of ppvit's q/v LoRA of rank 4; the patch
    embedding and head as ``modules_to_save``), called with ``adapter_names`` (one per image): the backbone runs
    once, and each LoRA layer and saved module runs each adapter's rows apart. Random tensors, LoRA B non-zero."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    backbone = create_backbone(MODEL, num_classes=10, weights=weights, img_size=size, **kwargs)
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=["attn.qkv"], modules_to_save=["patch_embed.proj", "head"])
    model = get_peft_model(backbone, cfg, adapter_name="t0")
    for i in range(1, tenants):
        model.add_adapter(f"t{i}", cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval().to(device)


def seconds(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def in_process(args: argparse.Namespace) -> None:
    print(f"\n## in-process on {args.device}, {args.batch} images a batch, lora-pe tenants, ViT-Ti/16 at {args.size}")
    compare(args, args.weights, args.size, split=True)
    print("\ntargets: routed / merged >= 0.8; routed / PEFT's adapter_names mixed batch >= 3 (and / split-per-adapter)")
    if args.host_cost:
        print(
            f"\n## the host's share: the same passes through ViT-Ti's layers at width {HOST_WIDTH} on 1 patch, on "
            f"{args.device} (every operator dispatched and launched, next to no arithmetic): the time a pass cannot go "
            "below however fast the device, where a serving pass of a few images is bound"
        )
        compare(args, None, HOST_SIZE, split=False, embed_dim=HOST_WIDTH, num_heads=1)
    vitb = count_params(apply_method(_meta_vit_b(), method_config("lora-pe"))).trainable
    print(
        f"ViT-B/16 lora-pe (10 classes): {vitb:,} values = {4 * vitb:,} bytes fp32 -> {2**32 // (4 * vitb):,} in 4 GiB"
    )


HOST_WIDTH, HOST_SIZE = 8, 16


def compare(args: argparse.Namespace, weights: str | None, size: int, split: bool, **kwargs: int) -> None:
    """Routed against merged (and against one pass per adapter, ``split``) for each of ``--tenant-counts``:
    a table of images/s (seconds per pass for the compute-free model, ``kwargs`` given)."""
    device = torch.device(args.device)
    base = create_backbone(MODEL, num_classes=10, weights=weights, img_size=size, **kwargs).to(device)
    meta = AdapterMeta(MODEL, 10, method_config("lora-pe").to_dict(), model_kwargs={"img_size": size, **kwargs})
    adapters = []
    for i in range(max(args.tenant_counts)):
        model, tensors = make_adapter(weights, size, i, **kwargs)
        if i == 0:
            merged = merge_adapters(model).eval().to(device)  # tenant 0 alone: a plain timm model
        adapters.append(routed_adapter(meta, {k: v.to(device) for k, v in tensors.items()}, base))
    graphs = device.type == "cuda"  # and routed and merged replayed as CUDA graphs (ppvit serve --cuda-graphs)
    peft = peft_mixed(weights, size, max(args.tenant_counts), device, **kwargs)
    graphed = RoutedViT(copy.deepcopy(base), capture=cuda_graph(device)) if graphs else None
    routed = RoutedViT(base)
    x = torch.randn(args.batch, 3, size, size, device=device)

    def drained(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return run

    def run_merged() -> None:
        with torch.no_grad():
            merged(x)

    if graphs:
        with torch.no_grad():
            run_merged_graph = cuda_graph(device)(lambda: merged(x))
    extra = " graphed img/s | merged graphed img/s | graphed / merged | graphed / merged graphed |" if graphs else ""
    if split:
        head = "| tenants | routed img/s | merged img/s | split img/s | PEFT adapter_names img/s | routed / merged |"
        print(f"{head} routed / split | routed / PEFT |{extra}")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * 4 * graphs)
    else:
        extra = extra.replace("img/s", "ms a pass")
        head = "| tenants | routed ms a pass | merged ms a pass | PEFT ms a pass | routed / merged | PEFT / routed |"
        print(f"{head} operators routed / merged / PEFT |{extra}")
        print("|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * 4 * graphs)
    waits = {}
    for k in args.tenant_counts:
        index = torch.arange(args.batch) % k  # in the host's memory, as the server's batcher builds it
        groups = [torch.nonzero(index == t).flatten().to(device) for t in range(k)]
        local = [torch.zeros(len(g), dtype=torch.long) for g in groups]

        def run_routed(k: int = k, index: torch.Tensor = index) -> None:
            routed(x, adapters[:k], index)

        def run_split(groups: list = groups, local: list = local) -> None:  # one forward per tenant's images
            for t, g in enumerate(groups):
                routed(x[g], [adapters[t]], local[t])

        variants = {"routed": drained(run_routed), "merged": drained(run_merged)}
        if split:
            variants["split"] = drained(run_split)
        names = [f"t{i}" for i in index.tolist()]

        def run_peft(names: list[str] = names) -> None:
            with torch.no_grad():
                peft(x, adapter_names=names)

        variants["PEFT"] = drained(run_peft)
        if graphed is not None:

            def run_graphed(k: int = k, index: torch.Tensor = index) -> None:
                graphed(x, adapters[:k], index)

            variants["graphed"] = drained(run_graphed)
            variants["merged graphed"] = drained(run_merged_graph)
        for fn in 3 * list(variants.values()):  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats if split else 10 * args.repeats):  # interleaved: drifts hit all alike
            for name, fn in variants.items():
                times[name].append(seconds(fn))
        sec = {name: statistics.median(v) for name, v in times.items()}
        # ratios of speed (img/s, >= 0.8 the target) where split, else of host time (ms a pass, as in BENCHMARKS.md)
        fast = {name: 1 / v if split else 1e3 * v for name, v in sec.items()}
        row = f"| {k} | "
        if split:
            ips = {name: args.batch * v for name, v in fast.items()}
            row += f"{ips['routed']:.0f} | {ips['merged']:.0f} | {ips['split']:.0f} | {ips['PEFT']:.0f} | "
            row += f"{ips['routed'] / ips['merged']:.3f} | {ips['routed'] / ips['split']:.2f} | "
            row += f"{ips['routed'] / ips['PEFT']:.2f} |"
        else:
            ms = {name: 1e3 * v for name, v in sec.items()}
            ops = {name: operators(fn) for name, fn in variants.items()}
            row += f"{ms['routed']:.2f} | {ms['merged']:.2f} | {ms['PEFT']:.2f} | {ms['routed'] / ms['merged']:.2f} | "
            row += f"{ms['PEFT'] / ms['routed']:.2f} | {ops['routed']} / {ops['merged']} / {ops['PEFT']} |"
        if graphs:
            shown = {n: args.batch * fast[n] if split else fast[n] for n in ("graphed", "merged graphed")}
            row += f" {shown['graphed']:.{0 if split else 2}f} | {shown['merged graphed']:.{0 if split else 2}f} | "
            row += f"{fast['graphed'] / fast['merged']:.3f} | {fast['graphed'] / fast['merged graphed']:.3f} |"
        print(row)
        if graphed is not None and split:
            waits[k] = host_waits(run_routed)
            waits[f"{k}, graphed"] = host_waits(run_graphed)
        if args.profile and split and k == max(args.tenant_counts):
            profile({"routed": variants["routed"], "merged": variants["merged"]}, device, k)
    for k, wait in waits.items():
        print(f"the host waited for the GPU in a routed pass of {k} tenants: {wait}")
    if graphed is not None and graphed.graphs is not None:
        failed = graphed.graphs.failed
        print(f"graphed: {graphed.graphs.captures} graphs recorded" + (f"; capture FAILED: {failed}" if failed else ""))
    if split:
        nbytes = adapters[0].nbytes
        print(f"\nresident lora-pe adapter, ViT-Ti/16 at {size}: {nbytes:,} bytes -> {2**30 // nbytes:,} per GiB")
        print(
            f"slot tables after the passes ({routed.slots.rows} slots, mixed passes' copies of adapters): "
            f"{routed.slots.nbytes:,} bytes"
        )


def host_waits(fn: Callable[[], None]) -> str:
    """ "never", or the first operation of ``fn`` that made the host wait for the GPU (CUDA's sync debug
    mode raises there): what the meta-device test cannot see (a blocking copy, a list index of a device tensor)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "never"
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def operators(fn: Callable[[], None]) -> int:
    """The aten operators one call dispatches (those called by others included): what the host does per pass
    whatever the device, and on a GPU, an upper bound on the kernels it launches."""
    from torch.profiler import profile as torch_profile

    with torch_profile() as prof:
        fn()
    return sum(e.name.startswith("aten::") for e in prof.events())


def profile(variants: dict[str, Callable[[], None]], device: torch.device, tenants: int) -> None:
    """Where a forward's time goes (torch.profiler, one forward each after the timed ones): the operators
    that take the most device time (self time, so nothing counts twice), to say why routed trails merged."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, fn in variants.items():
        with torch_profile(activities=activities) as prof:
            fn()
        print(f"\n### {name}, {tenants} tenants: the operators with the most {key.removesuffix('_total')}")
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=40))


def _meta_vit_b() -> torch.nn.Module:
    with torch.device("meta"):
        return create_backbone("vit_base_patch16_224", num_classes=10)


class LiveServer(threading.Thread):
    def __init__(self, root: Path, port: int, window_ms: float, device: str = "cpu") -> None:
        super().__init__(daemon=True)
        cfg = ServeConfig(root, window_ms=window_ms, device=device)
        self.server = uvicorn.Server(uvicorn_config(cfg, port=port))

    def run(self) -> None:
        self.server.run()


async def load_test(url: str, tokens: list[str], images: list[bytes], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal errors
        headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}", "Content-Type": "application/x-npy"}
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/predict", content=images[i % len(images)], headers=headers)
                    errors += r.status_code != 200
                except httpx.HTTPError:  # a refused or broken connection is an error, not the end of the test
                    errors += 1
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies) or [math.nan]
    return {
        "requests": len(lat),
        "rps": len(lat) / wall,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "errors": errors,
    }


def register_tenants(
    tmp: Path,
    count: int,
    weights: str | None,
    size: int,
    model_name: str = MODEL,
    prefix: str = "t",
    num_classes: int = 10,
    label_chars: int = 0,
) -> list[str]:
    """``count`` lora-pe tenants with random adapters of ``num_classes`` classes in the server folder
    ``tmp/root``; their tokens. ``label_chars``: each class named by that many characters (0: unnamed)."""
    store = TenantStore(tmp / "root")
    tokens = []
    sha = file_sha256(weights) if weights else None
    labels = [f"{c:0{label_chars}d}" for c in range(num_classes)] if label_chars else None
    for i in range(count):
        model, _ = make_adapter(weights, size, 1000 + i, model_name, num_classes)
        meta = AdapterMeta(
            model_name,
            num_classes,
            method_config("lora-pe").to_dict(),
            model_kwargs={"img_size": size},
            weights_sha256=sha,
            pretrained=False,
            init_seed=None if sha else 0,
            classes=labels,
        )
        save_adapter(model, meta, tmp / f"{prefix}{i}")
        tokens.append(store.add(f"{prefix}{i}", tmp / f"{prefix}{i}", weights))
    return tokens


def loopback(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    tokens = register_tenants(tmp, args.tenants, args.weights, args.size)
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(8):
        buf = io.BytesIO()
        np.save(buf, rng.integers(0, 256, (1, args.size, args.size, 3), dtype=np.uint8))
        bodies.append(buf.getvalue())
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = LiveServer(tmp / "root", port, args.window_ms, args.device)
    server.start()
    while not server.server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    asyncio.run(load_test(url, tokens, bodies, args.tenants, 3))  # warm-up: every adapter loaded
    result = asyncio.run(load_test(url, tokens, bodies, args.clients, args.seconds))
    server.server.should_exit = True
    server.join(30)
    print(
        f"\n## loopback on {args.device}: {args.clients} clients over {args.tenants} tenants, one image a request, "
        f"window {args.window_ms} ms, {args.seconds:.0f} s"
    )
    print("| requests | requests/s | p50 ms | p99 ms | errors |\n|---:|---:|---:|---:|---:|")
    print(
        f"| {result['requests']} | {result['rps']:.1f} | {result['p50_ms']:.0f} | {result['p99_ms']:.0f} | "
        f"{result['errors']} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV), help="ViT-Ti/16 weights (default $PPVIT_WEIGHTS)")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tenants", type=int, default=16, help="loopback: registered tenants")
    ap.add_argument(
        "--tenant-counts",
        type=lambda t: [int(v) for v in t.split(",")],
        default=None,
        help="in process: tenants per batch, comma-separated (default: --batch, one image each)",
    )
    ap.add_argument("--device", default="cpu", help="torch device of the in-process pass and the server (cuda)")
    ap.add_argument("--skip-loopback", action="store_true", help="the in-process part alone")
    ap.add_argument("--profile", action="store_true", help="profile routed and merged at the largest tenant count")
    ap.add_argument("--host-cost", action="store_true", help="also the passes' host time, at next to no arithmetic")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--window-ms", type=float, default=5)
    args = ap.parse_args()
    args.tenant_counts = args.tenant_counts or [args.batch]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    in_process(args)
    if not args.skip_loopback:
        loopback(args)


if __name__ == "__main__":
    main()

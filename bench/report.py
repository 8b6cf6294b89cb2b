"""The benchmark's report: the table printed last, and the chart of W1's seconds."""

from pathlib import Path


def table(res: dict) -> None:
    ours = res["systems"].get("ours", {}).get("seconds")
    print(
        f"\nW1 {res['workload']['items']} items ({res['mode']}), {res['gpu']}, torch {res['torch']}, "
        f"transformers {res['transformers']}"
    )
    for base, layout in res.get("attention", {}).items():
        print(f"  {base}: {layout}")
    print(
        f"{'system':18} {'seconds':>8} {'x ours':>7} {'correct':>8} {'passes':>7} {'peak GiB':>9} {'Orin proj s':>11}"
    )
    for name, r in res["systems"].items():
        ratio = f"{r['seconds'] / ours:7.1f}" if ours else "      -"
        proj = f"{r['orin_projection_s']:11.1f}" if "orin_projection_s" in r else "          -"
        print(
            f"{name:18} {r['seconds']:8.2f} {ratio} {r['correct']:>8} {r['passes']:>7} {r['peak_reserved_gib']:9.1f} {proj}"
        )
    for name, r in res["systems"].items():
        if r.get("decode"):
            d = r["decode"]
            print(
                f"  {name} decode: floor {d['floor_s']:.2f} s ({r['seconds'] / d['floor_s']:.2f}x), "
                f"{d['generated_tokens']} tokens, device {d['device_ms_per_pass']:.1f} ms a pass, host with no pass "
                f"in flight {d['host_ms_per_pass_no_pass_in_flight']:.2f} ms a pass, building inputs "
                f"{d['build_inputs_ms_per_pass']:.2f} ms a pass"
            )
    if "ours" in res["systems"]:
        print(
            f"floor (unique prompt FLOPs at the measured GEMM rate + ours' passes x weights at copy bandwidth): "
            f"{res['systems']['ours']['floor_s']:.2f} s"
        )
    for name, r in res.get("free", {}).get("systems", {}).items():
        print(
            f"free-running {res['free']['workload']['answer_tokens'] // res['free']['workload']['items']} tokens: "
            f"{name} {r['seconds']:.2f} s, {r['passes']} passes, drafts {r['stats']['draft_tokens']} "
            f"accepted {r['stats']['accepted_drafts']}"
        )
    if "fp32_exact" in res:
        print("fp32 exact:", res["fp32_exact"])
    if "passes_per_request" in res:
        print("passes per request (CPU, scripted):", res["passes_per_request"])
    for stage in ("capped", "uncapped"):
        for k, v in res.get(stage, {}).items():
            print(
                stage,
                k,
                v if not isinstance(v, dict) else {a: b for a, b in v.items() if a != "stats"},
            )
    for e in res.get("errors", []):
        print("ERROR", e)


def chart(res: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(res["systems"])
    secs = [res["systems"][n]["seconds"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(names, secs, color=["tab:green" if n.startswith("ours") else "tab:gray" for n in names])
    for i, s in enumerate(secs):
        ax.text(s, i, f" {s:.2f} s", va="center")
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds, W1 ({res['workload']['items']} items, {res['mode']}), {res['gpu']}")
    fig.tight_layout()
    fig.savefig(out / "w1_seconds.png", dpi=120)

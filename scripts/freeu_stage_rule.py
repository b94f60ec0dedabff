"""Measure FreeU by level (the pass, as diffusers) against FreeU by channel count (FreeU repo).

Runs the tiny float64 SD1.5 and SDXL UNets at 1/10 of the published widths (so 128 and 64
stand in for the official 1280 and 640) at 128x128 px, timestep 500, with the shipped
``freeu-sd15`` / ``freeu-sdxl`` factors, and prints the merges each rule touches and how far
the UNet outputs are apart, next to FreeU's own effect (pass against the plain UNet).

    PYTHONPATH=. python scripts/freeu_stage_rule.py        # about half a minute on one core

The official hook is the transcription in ``tests/passes/test_freeu_stage_rule.py``.
"""

from __future__ import annotations

from tests.passes import test_freeu_stage_rule as ref


def main() -> None:
    for name, settings in (("sd15", ref.SD15), ("sdxl", ref.SDXL)):
        m = ref.measure(name, settings)
        ours, channels, plain = m["ours"], m["channels"], m["plain"]
        diff = (channels - ours).abs()
        effect = (ours - plain).abs()
        print(f"{name}: widths {ref.WIDTHS[name]}, {settings}")
        for rule in ("level_merges", "channel_merges"):
            stages = {s: sorted(p for p, t in m[rule].items() if t == s) for s in (1, 2)}
            print(f"  {rule}: stage 1 {stages[1]}; stage 2 {stages[2]}")
        print(f"  by level vs official hook by level: max |diff| {(m['level'] - ours).abs().max():.3g}")
        print(f"  by channels vs by level: max |diff| {diff.max():.4g}, mean |diff| {diff.mean():.4g}, "
              f"relative L2 {(channels - ours).norm() / ours.norm():.4g}")
        print(f"  FreeU's own effect (by level vs plain): max |diff| {effect.max():.4g}, mean |diff| "
              f"{effect.mean():.4g}, relative L2 {(ours - plain).norm() / plain.norm():.4g}; "
              f"max |output| {ours.abs().max():.4g}")


if __name__ == "__main__":
    main()

"""Image-scaling attacks and Decamouflage on real photos: attack cost per scaler, detection
(white-box, black-box, built-in thresholds) on held-out photos, Quiring's median filter,
and per-image detection time at 896².

Benign set: 11 photos bundled with scikit-image / scikit-learn, 10 variants each (full,
flipped, crops, flipped crops) resized to 256² (model input 64², β = 4), i.e. 110 images.
Photos 0–5 form the calibration split, photos 6–10 the held-out split. Attack images hide
a held-out image of another photo in each held-out source (and likewise on the calibration
split). Run: `python benchmarks/scaling.py` on an idle machine (about 8 minutes; the timing
runs first on every core, the rest on one thread).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
from _harness import write_json
from skimage import data

from bastion.attacks.scalers import SCALERS, get_scaler, psnr
from bastion.attacks.scaling import ScalingAttack
from bastion.defenses.decamouflage import (
    DETECTORS,
    SCORES,
    Decamouflage,
    bundled_photos,
    csp_count,
    filter_scores,
    rescale_scores,
)
from bastion.defenses.scaling_defenses import scaling_advice, selective_median_filter

BIG, SMALL = (256, 256), (64, 64)
VULNERABLE = (
    "cv2.nearest",
    "cv2.linear",
    "cv2.cubic",
    "cv2.lanczos4",
    "pil.nearest",
    "torch.nearest",
    "torch.bilinear",
    "torch.bicubic",
)
ATTACKS_PER_SPLIT = 15


def variants(photo: np.ndarray) -> list[np.ndarray]:
    h, w = photo.shape[:2]
    crops = [
        photo,
        photo[: h * 3 // 4, : w * 3 // 4],
        photo[h // 4 :, w // 4 :],
        photo[: h * 3 // 4, w // 4 :],
        photo[h // 4 :, : w * 3 // 4],
    ]
    out = [*crops, *(c[:, ::-1] for c in crops)]
    return [
        cv2.resize(np.ascontiguousarray(c), BIG[::-1], interpolation=cv2.INTER_AREA) for c in out
    ]


def small(img: np.ndarray) -> np.ndarray:
    return cv2.resize(img, SMALL[::-1], interpolation=cv2.INTER_AREA)


def attack_set(scaler: str, images: list[np.ndarray], photo_of: list[int], seed: int) -> list:
    """(result, target) for random sources, each hiding an image of another photo."""
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(images))[:ATTACKS_PER_SPLIT]:
        j = int(rng.choice([k for k in range(len(images)) if photo_of[k] != photo_of[i]]))
        target = small(images[j])
        out.append((ScalingAttack(scaler)(images[i], target), target))
    return out


def rates(det: Decamouflage, benign: list, attacks: list) -> dict[str, dict[str, float]]:
    """TPR, FPR and balanced accuracy per score, detector and ensemble; the ensemble also
    with the spec's `combine="any"` (`ensemble_any`)."""
    sb, sa = det.score(benign), det.score(attacks)
    out = {}
    for combine in ("any", det.combine):
        det.combine = combine
        fb, fa = det.decide(sb), det.decide(sa)
        for k in (*SCORES, *DETECTORS, "ensemble"):
            tpr, fpr = float(fa[k].mean()), float(fb[k].mean())
            key = f"{k}_any" if combine == "any" and k in (*DETECTORS, "ensemble") else k
            out[key] = {"accuracy": (tpr + 1 - fpr) / 2, "tpr": tpr, "fpr": fpr}
    return out


def detection_time() -> dict[str, dict[str, float]]:
    """Per-image detection time at 896² on every core OpenCV uses (median of 25 runs after a
    warm-up; wall clock and process CPU time)."""
    img = cv2.resize(data.astronaut(), (896, 896), interpolation=cv2.INTER_AREA)
    pixels = img.astype(np.float32)
    det = Decamouflage("cv2.linear", (224, 224), thresholds=dict.fromkeys(SCORES, 0.0))
    parts = {
        "rescaling": lambda: rescale_scores(pixels, "cv2.linear", (224, 224)),
        "filtering": lambda: filter_scores(pixels),
        "steganalysis": lambda: csp_count(pixels),
        "ensemble": lambda: det.detect([img]),
    }
    timing, cpu = {}, {}
    for name, fn in parts.items():
        fn()
        wall, proc = [], []
        for _ in range(25):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - t)
            proc.append(time.process_time() - c)
        timing[name], cpu[name] = float(np.median(wall) * 1000), float(np.median(proc) * 1000)
    print("detection ms per 896² image, wall:", {k: round(v, 1) for k, v in timing.items()})
    print("detection ms per 896² image, CPU: ", {k: round(v, 1) for k, v in cpu.items()})
    return {"wall_ms": timing, "cpu_ms": cpu}


def main() -> None:
    # Timing first, on an idle machine and every core; the rest on one thread.
    speed = {"detection_ms_896": detection_time(), "cv2_threads": cv2.getNumThreads()}
    speed["loadavg_timing"] = os.getloadavg()
    cv2.setNumThreads(1)
    t0 = time.time()
    photos = bundled_photos()
    images, photo_of = [], []
    for p, photo in enumerate(photos):
        for v in variants(photo):
            images.append(v)
            photo_of.append(p)
    calib = [i for i, p in enumerate(photo_of) if p < 6]
    held = [i for i, p in enumerate(photo_of) if p >= 6]
    result: dict = {
        **speed,
        "benign_images": len(images),
        "calibration": len(calib),
        "held_out": len(held),
        "source_size": BIG,
        "input_size": SMALL,
    }

    # 1. attack cost per scaler (5 held-out pairs each)
    pairs = [(images[held[k]], small(images[held[(k + 13) % len(held)]])) for k in range(0, 40, 8)]
    cost = {}
    for name in SCALERS:
        res = [ScalingAttack(name)(s, t) for s, t in pairs]
        cost[name] = {
            "vulnerable": scaling_advice(name, BIG, SMALL).vulnerable,
            "psnr_source": float(np.mean([r.psnr_source for r in res])),
            "ssim_source": float(np.mean([r.ssim_source for r in res])),
            "psnr_target": float(np.mean([r.psnr_target for r in res])),
            "max_error_target": float(max(r.max_error_target for r in res)),
            "seconds": float(np.mean([r.seconds for r in res])),
            "converged": all(r.converged for r in res),
        }
        c = cost[name]
        print(
            f"{name:18s} vulnerable={c['vulnerable']!s:5s} PSNR(A,S)={c['psnr_source']:5.1f} "
            f"SSIM={c['ssim_source']:.2f} PSNR(f(A),T)={c['psnr_target']:5.1f} "
            f"max_err={c['max_error_target']:.0f} {c['seconds']:.2f}s"
        )
    result["attack_cost"] = cost
    vul = [c["psnr_source"] for c in cost.values() if c["vulnerable"]]
    rob = [c["psnr_source"] for c in cost.values() if not c["vulnerable"]]
    result["psnr_gap_db"] = {"min_vulnerable": min(vul), "max_robust": max(rob)}

    # 2. the 896² → 224² convergence check (coffee → chelsea, cv2 linear, RGB)

    src = cv2.resize(data.coffee(), (896, 896), interpolation=cv2.INTER_AREA)
    tgt = cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
    r = ScalingAttack("cv2.linear")(src, tgt)
    result["coffee_chelsea_896"] = r.metrics()
    print(
        f"896² cv2.linear: PSNR(A,S)={r.psnr_source:.2f} PSNR(f(A),T)={r.psnr_target:.1f} "
        f"{r.seconds:.1f}s {r.iterations} iterations"
    )

    # 3. detection per vulnerable scaler, calibrated on one split, evaluated on the other
    det_out, defense = {}, {}
    for k, name in enumerate(VULNERABLE):
        atk_c = attack_set(name, [images[i] for i in calib], [photo_of[i] for i in calib], k)
        atk_h = attack_set(name, [images[i] for i in held], [photo_of[i] for i in held], 100 + k)
        benign_c, benign_h = [images[i] for i in calib], [images[i] for i in held]
        a_c, a_h = [a.attack for a, _ in atk_c], [a.attack for a, _ in atk_h]
        white = Decamouflage(name, SMALL).calibrate(benign_c, a_c)
        black = Decamouflage(name, SMALL).calibrate(benign_c)
        builtin = Decamouflage(name, SMALL)
        modes = (("white-box", white), ("black-box", black), ("built-in", builtin))
        det_out[name] = {m: rates(d, benign_h, a_h) for m, d in modes}
        det_out[name]["thresholds"] = {"white-box": white.thresholds, "black-box": black.thresholds}
        f = get_scaler(name)
        # success: the scaled image is the target (PSNR ≥ 30 dB), before and after the filter
        ok_before = [r.psnr_target >= 30 for r, _ in atk_h]
        cleaned = [selective_median_filter(a, name, SMALL) for a in a_h]
        ok_after = [psnr(f(c, SMALL), t) >= 30 for c, (_, t) in zip(cleaned, atk_h, strict=True)]
        benign_def = [(selective_median_filter(b, name, SMALL), b) for b in benign_h[:20]]
        defense[name] = d = {
            "success_before": float(np.mean(ok_before)),
            "success_after_median": float(np.mean(ok_after)),
            "benign_psnr_image": float(np.mean([psnr(x, b) for x, b in benign_def])),
            "benign_psnr_scaled": float(
                np.mean([psnr(f(x, SMALL), f(b, SMALL)) for x, b in benign_def])
            ),
        }
        w, bb, bi = (det_out[name][m]["ensemble"] for m in ("white-box", "black-box", "built-in"))
        ba = det_out[name]["black-box"]["ensemble_any"]
        print(
            f"{name:15s} ensemble accuracy white {w['accuracy']:.3f} black {bb['accuracy']:.3f} "
            f"(fpr {bb['fpr']:.3f}; any: fpr {ba['fpr']:.3f}) built-in {bi['accuracy']:.3f} "
            f"(fpr {bi['fpr']:.3f}) | median: "
            f"success {d['success_before']:.2f} -> {d['success_after_median']:.2f}, benign PSNR "
            f"{d['benign_psnr_image']:.1f} / scaled {d['benign_psnr_scaled']:.1f}"
        )
    result["detection"], result["median_defense"] = det_out, defense

    result["loadavg"] = os.getloadavg()
    result["seconds"] = time.time() - t0
    out = Path(__file__).parent / "results" / "scaling.json"
    write_json(out, result, indent=1)
    print(f"wrote {out} in {result['seconds']:.0f}s, load {result['loadavg']}")


if __name__ == "__main__":
    main()

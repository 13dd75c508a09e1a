"""What fxlora_startup.pth costs a process that never imports accelerate: median `python -c pass`, with and without it.

    python benchmarks/startup_hook.py SITE_PACKAGES PYTHON RUNS   # moves the .pth aside for every other run
"""
import os, statistics, subprocess, sys, time, shutil
sp = sys.argv[1]; py = sys.argv[2]; n = int(sys.argv[3])
pth = os.path.join(sp, "fxlora_startup.pth"); off = pth + ".off"
t = {"hook": [], "none": []}
for i in range(n):
    for mode in ("hook", "none") if i % 2 == 0 else ("none", "hook"):
        if mode == "none": os.rename(pth, off)
        try:
            s = time.perf_counter(); subprocess.run([py, "-c", "pass"], check=True); t[mode].append(time.perf_counter() - s)
        finally:
            if mode == "none": os.rename(off, pth)
for k, v in t.items(): print(k, f"{statistics.median(v)*1e3:.2f} ms")
print("delta", f"{(statistics.median(t['hook'])-statistics.median(t['none']))*1e3:.2f} ms")

"""Round-trip latency of Bus.call from Python: ARGV[1] calls (1 KiB) to the "echo" service
after a warm-up; prints calls/s and the p50/p99 in microseconds (perf_counter per call).
Run beside examples/c/rtt.c and `aegisctl bench --clients 1` against `aegisctl serve echo --echo`."""
import sys, time, aegis_ipc
bus = aegis_ipc.Bus.connect()
p = b"\x07" * 1024
n = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
for _ in range(n // 10):
    bus.call("echo", "echo", p)
lat = []
t0 = time.perf_counter()
for _ in range(n):
    t = time.perf_counter()
    bus.call("echo", "echo", p)
    lat.append(time.perf_counter() - t)
total = time.perf_counter() - t0
lat.sort()
print(f"Python: {n} calls, {n/total:.0f} calls/s, p50 {lat[n//2]*1e6:.2f} us, p99 {lat[n*99//100]*1e6:.2f} us")

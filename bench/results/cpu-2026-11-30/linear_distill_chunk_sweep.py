# Forward of linear_distillation_loss at 2048 x 256 x 32000 fp32 for chunk sizes of 128-2048 rows, beside
# the matmuls alone and the materialised-logits path (median of 3 after one warm-up, no_grad).
# Run: python bench/results/cpu-2026-11-30/linear_distill_chunk_sweep.py
import time, torch, fused_ce, torch.nn.functional as F
torch.manual_seed(0)
N,D,V=2048,256,32000
xs=torch.randn(N,D); ws=torch.randn(V,D)*D**-0.5; xt=torch.randn(N,D); wt=torch.randn(V,D)*2*D**-0.5
def t(fn, reps=3):
    fn(); ts=[]
    for _ in range(reps):
        a=time.perf_counter(); fn(); ts.append(time.perf_counter()-a)
    return sorted(ts)[len(ts)//2]*1e3
with torch.no_grad():
    print("matmul only x2", t(lambda: (xs@ws.T, xt@wt.T)))
    print("logits+distill", t(lambda: fused_ce.distillation_loss(xs@ws.T, xt@wt.T, reduction="batchmean")))
    for c in (128,256,512,1024,2048):
        print(c, t(lambda: fused_ce.linear_distillation_loss(xs,ws,xt,wt,reduction="batchmean",chunk_size=c)))
    s=xs@ws.T; tt=xt@wt.T
    print("distill kernel alone", t(lambda: torch.ops.fused_ce.distill_forward(s,tt,0,0.5,1.0)))
    s=s[:128].contiguous(); tt=tt[:128].contiguous()
    print("distill kernel 128 rows x16", 16*t(lambda: torch.ops.fused_ce.distill_forward(s,tt,0,0.5,1.0)))
    print("mm 128 rows x32", 32*t(lambda: xs[:128]@ws.T))
    out=torch.empty(128,V)
    print("mm 128 rows out= x32", 32*t(lambda: torch.mm(xs[:128],ws.t(),out=out)))

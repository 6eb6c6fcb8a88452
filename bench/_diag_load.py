import sys, time, os
t=time.perf_counter()
import torch
from diffusers import StableDiffusionXLPipeline
print("imports", round(time.perf_counter()-t,2), flush=True)
d=sys.argv[1]; mode=sys.argv[2]
torch.cuda.init(); torch.zeros(1,device="cuda"); torch.cuda.synchronize()
t=time.perf_counter()
if mode=="to":
    p=StableDiffusionXLPipeline.from_pretrained(d, dtype=torch.bfloat16, use_safetensors=True, local_files_only=True)
    t1=time.perf_counter(); p=p.to("cuda"); torch.cuda.synchronize()
    print(mode, "cpu load", round(t1-t,2), "to cuda", round(time.perf_counter()-t1,2), flush=True)
else:
    p=StableDiffusionXLPipeline.from_pretrained(d, dtype=torch.bfloat16, use_safetensors=True, local_files_only=True, device_map=mode)
    torch.cuda.synchronize()
    print(mode, "load", round(time.perf_counter()-t,2), {k: str(getattr(v,'device',None)) for k,v in p.components.items()}, flush=True)

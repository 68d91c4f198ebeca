"""Run one AVX2 gather (VPGATHERDD) with index register ymm4 and the same with ymm5.

Prints one JSON line: which of the two read the right elements.  On a CPU that does
not offer AVX2 the first gather is an illegal instruction: the process dies of SIGILL,
which is what a job that needs AVX2 must see rather than wrong numbers.
Usage: python gather_probe.py
"""
import ctypes
import json
import mmap

# probe(base, index, out4, out5), System V AMD64; assembled from:
#   vmovdqu ymm4, [rsi]; vpcmpeqd ymm1, ymm1, ymm1; vpxor ymm0, ymm0, ymm0
#   vpgatherdd ymm0, [rdi+ymm4*4], ymm1; vmovdqu [rdx], ymm0
#   vmovdqu ymm5, [rsi]; vpcmpeqd ymm1, ymm1, ymm1; vpxor ymm0, ymm0, ymm0
#   vpgatherdd ymm0, [rdi+ymm5*4], ymm1; vmovdqu [rcx], ymm0
#   vzeroupper; ret
CODE = bytes.fromhex(
    "c5fe6f26" "c5f576c9" "c5fdefc0" "c4e2759004a7" "c5fe7f02"
    "c5fe6f2e" "c5f576c9" "c5fdefc0" "c4e2759004af" "c5fe7f01"
    "c5f877" "c3"
)

Int8 = ctypes.c_int32 * 8
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(CODE)
probe = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
    ctypes.addressof(ctypes.c_char.from_buffer(page)))
base = (ctypes.c_int32 * 64)(*range(1000, 1064))
index = Int8(0, 3, 6, 9, 12, 15, 18, 21)
want = [1000 + i for i in index]
out4, out5 = Int8(), Int8()
probe(base, index, out4, out5)
print(json.dumps({"ymm4": list(out4) == want, "ymm5": list(out5) == want,
                  "got_ymm4": list(out4), "want": want}), flush=True)

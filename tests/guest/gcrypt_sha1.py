"""SHA-1 through the guest's libgcrypt (apt's hashing), against hashlib's.

libgcrypt 1.10 takes its "AVX + BMI2" SHA-1 whenever the CPU has both, and that code runs
VPBROADCASTD, an AVX2 instruction: a guest offered BMI2 without AVX2 dies here with SIGILL.
Prints one JSON line: both digests.
"""
import ctypes
import ctypes.util
import hashlib
import json

GCRY_MD_SHA1 = 2

data = bytes(range(256)) * 4096
gcrypt = ctypes.CDLL(ctypes.util.find_library("gcrypt") or "libgcrypt.so.20")
gcrypt.gcry_check_version.restype = ctypes.c_char_p
version = gcrypt.gcry_check_version(None).decode()
digest = ctypes.create_string_buffer(20)
gcrypt.gcry_md_hash_buffer(GCRY_MD_SHA1, digest, data, ctypes.c_size_t(len(data)))
print(json.dumps({"libgcrypt": version, "gcrypt": digest.raw.hex(), "hashlib": hashlib.sha1(data).hexdigest()}))

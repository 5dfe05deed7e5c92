"""The CPU and native code: C and C++ built on first use, and the CPU worker threads.

* :mod:`.build`: builds a C/C++ source with the system's compiler (cached per machine), loads it
  and types its functions from their C definitions; None where it cannot, and a fallback serves.
* :mod:`.kernels` (``kernels.c``): fused fp32 row kernels of the chunked LSH path and the hash.
* :mod:`.allocator` (``allocator.cpp``): ``keep_freed_memory``, the caching CPU allocator (or
  glibc's heap kept) that ``reformer train`` installs.
* :mod:`.workers`: independent CPU blocks on single-threaded worker threads.
"""

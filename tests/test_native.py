"""reformer.native.build: each C function's ctypes prototype is read from its definition, for
every function a library exports, and the kernels' wrappers pass each function exactly its
parameters (ctypes would pass extra ones on silently)."""

import ctypes
import shutil
import subprocess

import pytest
import torch

from reformer import LSHAttention
from reformer.native import allocator, build, kernels

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the kernels are not built")


def test_prototypes_follow_the_c_definitions():
    source = """
static inline float helper(float x) { return x; }
void reformer_a(const float *x, float *y,
                int64_t n, float scale, int flag) {
}
int reformer_b(size_t bytes) {
void reformer_c(size_t* in_use, const int64_t *rows) {
"""
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    assert build.prototypes(source) == {
        "reformer_a": ([ptr, ptr, i64, f32, ctypes.c_int], None),
        "reformer_b": ([ctypes.c_size_t], ctypes.c_int),
        "reformer_c": ([ptr, ptr], None),
    }


def test_a_c_type_without_a_ctypes_equivalent_is_named():
    with pytest.raises(ValueError, match="reformer_d: no ctypes type for C type 'double'"):
        build.prototypes("void reformer_d(double x) {\n}")


def _library(module: str) -> ctypes.CDLL:
    lib = kernels._library() if module == "kernels" else allocator._pool_library()
    if lib is None:
        pytest.skip(f"the {module} library cannot be built here")
    return lib


@needs_cc
@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm to list a library's symbols")
@pytest.mark.parametrize("module", ["kernels", "allocator"])
def test_every_function_a_library_exports_has_its_prototype(module):
    lib = _library(module)
    listed = subprocess.run(["nm", "-D", "--defined-only", lib._name], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in listed.stdout.splitlines() if line.split()[-1].startswith("reformer_")}
    source = (kernels if module == "kernels" else allocator).SOURCE
    assert exported and exported == set(build.prototypes(source.read_text()))


class _Strict:
    """A loaded library whose functions refuse a call with other than their declared parameters,
    and record which were called."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib, self.called = lib, set()

    def __getattr__(self, name: str):
        fn = getattr(self.lib, name)

        def call(*args):
            assert len(args) == len(fn.argtypes), f"{name}: {len(args)} arguments for {len(fn.argtypes)} parameters"
            self.called.add(name)
            return fn(*args)

        return call


@needs_cc
def test_the_wrappers_pass_each_kernel_its_parameters(monkeypatch):
    monkeypatch.delenv("REFORMER_CPU_KERNELS", raising=False)
    strict = _Strict(_library("kernels"))
    monkeypatch.setattr(kernels, "_library", lambda: strict)
    # fused strict causal windows (32 + 32 keys), unfused strict ones (8 + 8 keys: not whole
    # tiles) and non-causal ones, forward and backward, with the hash and the slot sort
    for causal, bucket_size in [(True, 32), (True, 8), (False, 32)]:
        layer = LSHAttention(bucket_size=bucket_size, n_hashes=2, causal=causal)
        qk, v = torch.randn(2, 128, 16, requires_grad=True), torch.randn(2, 128, 16, requires_grad=True)
        layer(qk, v)[0].square().sum().backward()
    assert strict.called == set(build.prototypes(kernels.SOURCE.read_text()))


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: the pool is not built")
def test_pool_bytes_passes_the_stats_function_its_parameters(monkeypatch):
    strict = _Strict(_library("allocator"))
    monkeypatch.setattr(allocator, "_pool_library", lambda: strict)
    in_use, touched = allocator.pool_bytes()  # (the pool may be installed: a CLI test trains in process)
    assert 0 <= in_use <= touched
    assert strict.called == {"reformer_cpu_allocator_stats"}

"""Shared by the kernel tests: compiling Triton kernels for a GPU this machine does not have, and
running the sparse CPU kernel's variants in turn."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kernels import sparse

CompileForH100 = Callable[[object, dict[str, object], dict[str, str], str], object]


@pytest.fixture(scope="session")
def compile_for_h100() -> CompileForH100:
    """compile(kernel, constexpr values, pointer element types, default pointer type): the
    kernel compiled to SASS for an H100 (sm_90), which catches what the interpreter lets
    through (types, dot shapes, control flow). Integers are i32, strides i64."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret:
        pytest.fail("TRITON_INTERPRET is set for the whole run: unset it, tests set it per test")

    def compile_(kernel, constants, pointers, default_pointer):
        signature = {}
        for name in kernel.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*" + pointers.get(name, default_pointer)
            else:
                signature[name] = "i64" if name.startswith("stride") else "i32"
        constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
        source = ASTSource(kernel, signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert "sass" in compiled.asm or "cubin" in compiled.asm
        return compiled

    return compile_


@pytest.fixture(params=["avx512", "avx2"])
def sparse_variant(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each variant of the sparse CPU kernel this CPU runs in turn (kernels.sparse.set_variant),
    the default again afterwards."""
    variant = request.param
    if variant not in sparse.variants():
        pytest.skip(f"this CPU cannot run the {variant} sparse kernel")
    sparse.set_variant(variant)
    try:
        yield variant
    finally:
        sparse.set_variant(sparse.variants()[0])

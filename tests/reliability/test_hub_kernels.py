"""bitsandbytes asks the `kernels` package for a kernel from the Hugging Face Hub when it is
imported on a CPU with AVX512-BF16, i.e. code fetched from the Hub and run in-process. moeconv
imports bitsandbytes through one gateway that makes that lookup fail (bitsandbytes then uses its
own kernel)."""
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("bitsandbytes")

_PROBE = textwrap.dedent("""
    import sys, types
    calls = []
    stub = types.ModuleType("kernels")
    stub.get_kernel = lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(RuntimeError("stub"))
    sys.modules["kernels"] = stub
    {imports}
    from bitsandbytes.functional import has_avx512bf16
    print("asked" if calls else "not-asked", "avx512bf16" if has_avx512bf16() else "no-avx512bf16")
""")


def _probe(imports: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(imports=imports)], capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "0", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_bitsandbytes_through_moeconv_never_asks_the_hub_for_a_kernel():
    asked, cpu = _probe("import bitsandbytes")  # the library on its own, as a control
    if cpu != "avx512bf16":
        pytest.skip("bitsandbytes asks for a Hub kernel only on CPUs with AVX512-BF16")
    assert asked == "asked"  # without the gateway the Hub lookup happens
    assert _probe("from moeconv.nn.quantized import _bnb; _bnb()")[0] == "not-asked"
    # transformers imports bitsandbytes itself to load a bitsandbytes checkpoint: after moeconv's
    # transformers gateway is imported, that import does not ask either
    assert _probe("import moeconv.io.transformers_io; import bitsandbytes")[0] == "not-asked"

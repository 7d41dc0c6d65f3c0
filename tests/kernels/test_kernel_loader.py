"""The loader finds kernels without executing what is missing, and says why when it can't.

Fake packages in ``tmp_path`` play mamba-ssm (whose ``__init__`` fails on the missing
Mamba-1 extension, after importing a child) and causal-conv1d (without its CUDA
extension)."""

import sys
import textwrap

from torchtitan_nemotron3.ops import loader

FAKE_EXTENSION = "nemotron3_test_selective_scan_cuda"


def write_tree(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def fake_mamba_ssm(root, ssd_source: str | None = None) -> None:
    write_tree(
        root,
        {
            "mamba_ssm/__init__.py": f"""
            __version__ = "0.0.fake"
            from mamba_ssm.utils import helper  # imported, then the package fails
            import {FAKE_EXTENSION}
        """,
            "mamba_ssm/utils/__init__.py": "helper = 'helper'\n",
            "mamba_ssm/ops/__init__.py": "",
            "mamba_ssm/ops/triton/__init__.py": "",
            "mamba_ssm/ops/triton/ssd_combined.py": ssd_source
            or """
            from mamba_ssm.utils import helper

            def _mamba_chunk_scan_combined_fwd(*args, **kwargs):
                return ("fwd", helper)

            def _mamba_chunk_scan_combined_bwd(*args, **kwargs):
                return ("bwd", helper)
        """,
            "mamba_ssm/ops/triton/layernorm_gated.py": """
            def _layer_norm_fwd(*args, **kwargs):
                return "norm fwd"

            def _layer_norm_bwd(*args, **kwargs):
                return "norm bwd"
        """,
        },
    )


def kernel_modules(package: str) -> list[str]:
    return sorted(n for n in sys.modules if n == package or n.startswith(package + "."))


def assert_no_orphans(package: str) -> None:
    """Every loaded submodule hangs off a loaded parent, as attribute and module."""
    for name in kernel_modules(package):
        if "." in name:
            parent, child = name.rsplit(".", 1)
            assert parent in sys.modules, f"{name} is an orphan"
            assert getattr(sys.modules[parent], child) is sys.modules[name], name


def test_failing_init_loads_through_a_bare_package(module_sandbox):
    fake_mamba_ssm(module_sandbox)
    kernels, status = loader._load_ssd()

    assert status.available, status
    assert "bare package" in status.detail and FAKE_EXTENSION in status.detail
    assert kernels.fwd() == ("fwd", "helper") and kernels.bwd() == ("bwd", "helper")
    assert kernels.norm_fwd() == "norm fwd" and kernels.norm_bwd() == "norm bwd"
    bare = sys.modules["mamba_ssm"]
    assert getattr(bare, loader.BARE_PACKAGE_ATTR).startswith("import mamba_ssm failed")
    assert list(bare.__path__) == [str(module_sandbox / "mamba_ssm")]
    assert bare.ops.triton.ssd_combined._mamba_chunk_scan_combined_fwd is kernels.fwd
    assert FAKE_EXTENSION not in sys.modules
    assert_no_orphans("mamba_ssm")

    # A second load reuses the bare package.
    _, how = loader.import_bypassing_init("mamba_ssm", "ops.triton.ssd_combined")
    assert how == "bare package"


def test_orphans_left_by_an_earlier_failed_import_are_dropped(module_sandbox):
    """Someone else (transformers does this) tried ``import mamba_ssm`` first."""
    fake_mamba_ssm(module_sandbox)
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        pass
    assert "mamba_ssm" not in sys.modules and "mamba_ssm.utils" in sys.modules
    _, status = loader._load_ssd()
    assert status.available, status
    assert_no_orphans("mamba_ssm")


def test_a_submodule_that_fails_too_leaves_no_trace(module_sandbox):
    fake_mamba_ssm(module_sandbox, ssd_source="import triton_that_is_not_there\n")
    kernels, status = loader._load_ssd()
    assert kernels is None and not status.available
    assert "triton_that_is_not_there" in str(status)
    assert kernel_modules("mamba_ssm") == []


def test_a_missing_package_is_a_clean_unavailable(module_sandbox):
    kernels, status = loader._load_ssd("nemotron3_no_such_package")
    assert kernels is None
    assert str(status) == (
        "mamba-ssm Triton SSD: unavailable: nemotron3-no-such-package not installed"
    )
    kernels, status = loader._load_conv("nemotron3_no_such_package")
    assert kernels is None
    assert str(status) == (
        "causal-conv1d CUDA conv: unavailable: nemotron3-no-such-package not installed"
    )


def test_causal_conv1d_without_its_extension_is_never_imported(module_sandbox):
    write_tree(
        module_sandbox,
        {
            "causal_conv1d/__init__.py": "raise RuntimeError('must not be executed')\n",
            "causal_conv1d/cpp_functions.py": "",
        },
    )
    kernels, status = loader._load_conv(extension="nemotron3_test_causal_conv1d_cuda")
    assert kernels is None
    assert (
        "CUDA extension nemotron3_test_causal_conv1d_cuda is missing" in status.detail
    )
    assert kernel_modules("causal_conv1d") == []


def test_causal_conv1d_with_its_extension_loads(module_sandbox):
    write_tree(
        module_sandbox,
        {
            "causal_conv1d/__init__.py": "",
            "nemotron3_test_causal_conv1d_cuda.py": "",
            "causal_conv1d/cpp_functions.py": """
            import nemotron3_test_causal_conv1d_cuda

            def causal_conv1d_fwd_function(*args):
                return "fwd"

            def causal_conv1d_bwd_function(*args):
                return "bwd"
        """,
        },
    )
    kernels, status = loader._load_conv(extension="nemotron3_test_causal_conv1d_cuda")
    assert status.available, status
    assert (kernels.fwd(), kernels.bwd()) == ("fwd", "bwd")
    sys.modules.pop("nemotron3_test_causal_conv1d_cuda", None)


def test_this_machine_reports_a_status_for_each_kernel(module_sandbox):
    """Whatever is installed here, the answer is a kernel or a reason."""
    for load in (loader.ssd_kernels, loader.conv_kernels):
        kernels, status = load()
        assert (kernels is not None) == status.available and status.detail
        print(status)

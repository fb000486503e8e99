"""Checking and running the centroid-head Metal kernels without a Mac.

``kernel_source(launch)`` rebuilds the exact text MLX compiles for a ``Launch`` (a port of
``write_signature`` and the kernel naming in ``mlx/backend/common/metal_kernel.cpp``, MLX 0.32;
MLX prepends its Metal utils, which ``metal_shim.h`` stands in for). ``clang_errors`` syntax-checks
that text with libclang; ``Emulator`` compiles the same header and body with g++ against
``metal_emu.h`` and runs every thread of a launch on the CPU.
"""

import ctypes
import hashlib
import re
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_gemma_mtp import kernels as metal_kernels
from mlx_gemma_mtp.models.centroid_head import Launch

SHIM_DIR = Path(__file__).parent

MAX_CONSTANT_ARRAY_SIZE = 8  # inputs with fewer elements go to the constant address space

TYPE_NAMES = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}

# In MLX's order; an attribute becomes a parameter when its name occurs in the body.
ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]


def template_value(value) -> str:
    if isinstance(value, bool):  # before int: bool is an int in Python
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return TYPE_NAMES[value]


def template_type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    return "int" if isinstance(value, int) else "typename"


def write_template(template: list) -> str:
    return "<" + ", ".join(template_value(v) for _, v in template) + ">"


def kernel_name(name: str, launch: Launch) -> str:
    result = "custom_kernel_" + name
    if launch.template:
        result += "_" + re.sub(r"<|>|, ", "_", write_template(launch.template))[:-1]
    for a in launch.inputs:
        result += "_" + TYPE_NAMES[a.dtype]
        result += "s" if a.ndim == 0 else "c" if a.size < MAX_CONSTANT_ARRAY_SIZE else ""
    for dtype in launch.output_dtypes:
        result += "_" + TYPE_NAMES[dtype]
    return result


def mlx_parameter(location: str, type_name: str, ref: str, name: str) -> str:
    return f"const {location} {type_name}{ref} {name}"


def write_signature(
    func_name: str,
    header: str,
    body: str,
    input_names,
    launch: Launch,
    output_names,
    parameter=mlx_parameter,
    output_parameter=None,
) -> str:
    """MLX's ``write_signature``: header, template line, signature, body. ``parameter`` and
    ``output_parameter`` write the buffer parameters (MLX's text by default)."""
    text = header
    if launch.template:
        params = ", ".join(f"{template_type(v)} {n}" for n, v in launch.template)
        text += f"template <{params}>\n"
    text += f"[[kernel]] void {func_name}(\n"
    index = 0
    for name, a in zip(input_names, launch.inputs, strict=True):
        location = "constant" if a.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if a.ndim == 0 else "*"
        text += f"  {parameter(location, TYPE_NAMES[a.dtype], ref, name)} [[buffer({index})]],\n"
        index += 1
        if a.ndim > 0:
            for suffix, decl in (
                ("_shape", "const constant int* {}"),
                ("_strides", "const constant int64_t* {}"),
                ("_ndim", "const constant int& {}"),
            ):
                if name + suffix in body:
                    text += f"  {decl.format(name + suffix)} [[buffer({index})]],\n"
                    index += 1
    attributes = [f"  {t} {a} [[{a}]]" for a, t in ATTRIBUTES if a in body]
    for name, dtype in zip(output_names, launch.output_dtypes, strict=True):
        if output_parameter is None:
            text += f"  device {TYPE_NAMES[dtype]}* {name} [[buffer({index})]]"
        else:
            text += f"  {output_parameter(TYPE_NAMES[dtype], name)} [[buffer({index})]]"
        last = index >= len(launch.inputs) + len(output_names) - 1 and not attributes
        text += ") {\n" if last else ",\n"
        index += 1
    for i, attribute in enumerate(attributes):
        text += attribute + (",\n" if i < len(attributes) - 1 else ") {\n")
    return text + body + "\n}\n"


def instantiation(func_name: str, launch: Launch) -> str:
    if not launch.template:
        return ""
    template_def = func_name + write_template(launch.template)
    return (
        f'\ntemplate [[host_name("{func_name}")]] [[kernel]] decltype({template_def}) '
        f"{template_def};\n"
    )


def kernel_parts(launch: Launch, body: str | None = None, header: str | None = None):
    spec = metal_kernels.SPECS[launch.kernel]
    body = metal_kernels.source(spec.source) if body is None else body
    header = metal_kernels.source(metal_kernels.HEADER) if header is None else header
    return spec, body, header


def kernel_source(launch: Launch, body: str | None = None, header: str | None = None) -> str:
    """The text MLX compiles for ``launch`` (after its utils), optionally with another body or
    header (planted errors)."""
    spec, body, header = kernel_parts(launch, body, header)
    name = kernel_name(spec.name, launch)
    text = write_signature(name, header, body, spec.input_names, launch, spec.output_names)
    return text + instantiation(name, launch)


# -- compile-level check -------------------------------------------------------------------------


# C++ allows no attributes between `template` and an explicit instantiation; Metal's clang does.
INSTANTIATION_ATTRIBUTES = re.compile(r'^template \[\[host_name\("\w+"\)\]\] \[\[kernel\]\] ', re.M)


def clang_errors(text: str) -> list[str]:
    """Errors clang finds in ``text`` compiled as C++17 after ``metal_shim.h`` (with the
    attributes of the explicit instantiation line dropped: standard C++ rejects them there)."""
    from clang import cindex

    source = '#include "metal_shim.h"\n' + INSTANTIATION_ATTRIBUTES.sub("template ", text)
    tu = cindex.Index.create().parse(
        "kernel.cpp",
        args=["-x", "c++", "-std=c++17", f"-I{SHIM_DIR}", "-Wno-unknown-attributes"],
        unsaved_files=[("kernel.cpp", source)],
    )
    return [
        f"{d.location.line - 1}:{d.location.column}: {d.spelling}"
        for d in tu.diagnostics
        if d.severity >= cindex.Diagnostic.Error
    ]


# -- CPU emulation -------------------------------------------------------------------------------

NUMPY_TYPES = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,  # raw bits
    mx.int32: np.int32,
    mx.uint32: np.uint32,
    mx.int64: np.int64,
}


class Variant:
    """One launch configuration compiled for the emulator: its C++ text and entry point."""

    def __init__(self, launch: Launch, body: str | None, header: str | None):
        spec, body, header = kernel_parts(launch, body, header)
        name = kernel_name(spec.name, launch)
        text = write_signature(
            name,
            header,
            body,
            spec.input_names,
            launch,
            spec.output_names,
            parameter=lambda _loc, t, _ref, n: f"emu::checked_ptr<const {t}> {n}",
            output_parameter=lambda t, n: f"emu::checked_ptr<{t}> {n}",
        )
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.entry = f"run_{self.key}"
        args = []
        buffers = [
            (n, TYPE_NAMES[a.dtype], True)
            for n, a in zip(spec.input_names, launch.inputs, strict=True)
        ]
        buffers += [
            (n, TYPE_NAMES[d], False)
            for n, d in zip(spec.output_names, launch.output_dtypes, strict=True)
        ]
        for i, (n, t, const) in enumerate(buffers):
            t = f"const {t}" if const else t
            args.append(f'emu::checked_ptr<{t}>{{({t}*)buffers[{i}], 0, sizes[{i}], "{n}"}}')
        args += [f"a.{a}" for a, _ in ATTRIBUTES if a in body]
        call = f"ns_{self.key}::{name}{write_template(launch.template)}({', '.join(args)});"
        self.cpp = (
            f"namespace ns_{self.key} {{\n{text}}}\n"
            f'extern "C" int {self.entry}(void** buffers, const long* sizes, '
            f"const unsigned* dims, char* message, int message_size) {{\n"
            f"  std::function<void(const emu::Attributes&)> body = "
            f"[&](const emu::Attributes& a) {{ {call} }};\n"
            f"  return emu::launch({{dims[0], dims[1], dims[2]}}, {{dims[3], dims[4], dims[5]}}, "
            f"body, message, message_size);\n}}\n"
        )


class EmulationError(RuntimeError):
    pass


class Emulator:
    """Runs ``Launch``es on the CPU. ``prepare`` compiles many variants in one g++ run."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.entries = {}  # variant key -> ctypes function

    def prepare(self, launches, body: str | None = None, header: str | None = None) -> None:
        variants = {}
        for launch in launches:
            v = Variant(launch, body, header)
            if v.key not in self.entries:
                variants[v.key] = v
        if not variants:
            return
        digest = hashlib.sha256("".join(sorted(variants)).encode()).hexdigest()[:16]
        cpp = self.workdir / f"kernels_{digest}.cpp"
        lib = self.workdir / f"kernels_{digest}.so"
        cpp.write_text('#include "metal_emu.h"\n' + "".join(v.cpp for v in variants.values()))
        result = subprocess.run(
            [
                "g++",
                "-std=c++17",
                "-O1",
                "-shared",
                "-fPIC",
                "-Wno-attributes",
                f"-I{SHIM_DIR}",
                str(cpp),
                "-o",
                str(lib),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise EmulationError(f"g++ failed:\n{result.stderr[-4000:]}")
        so = ctypes.CDLL(str(lib))
        for key, v in variants.items():
            entry = getattr(so, v.entry)
            entry.restype = ctypes.c_int
            self.entries[key] = entry

    def run(self, launch: Launch, body: str | None = None, header: str | None = None) -> list:
        """The outputs of ``launch``, computed by running every thread of it on the CPU."""
        v = Variant(launch, body, header)
        if v.key not in self.entries:
            self.prepare([launch], body, header)
        inputs = [np.ascontiguousarray(host(a)) for a in launch.inputs]
        outputs = [
            np.zeros(shape, dtype=NUMPY_TYPES[dtype])
            for shape, dtype in zip(launch.output_shapes, launch.output_dtypes, strict=True)
        ]
        arrays = inputs + outputs
        buffers = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        sizes = (ctypes.c_long * len(arrays))(*[a.size for a in arrays])
        dims = (ctypes.c_uint * 6)(*launch.grid, *launch.threadgroup)
        message = ctypes.create_string_buffer(1024)
        if self.entries[v.key](buffers, sizes, dims, message, len(message)) != 0:
            raise EmulationError(message.value.decode())
        return [device(o, dtype) for o, dtype in zip(outputs, launch.output_dtypes, strict=True)]


def host(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def device(a: np.ndarray, dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(a).view(mx.bfloat16)
    return mx.array(a)

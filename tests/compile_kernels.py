"""Compiles every fused SRM kernel (srm_hf.fused) for an NVIDIA H100 (sm_90) with Triton's own compiler and ptxas,
no GPU needed, at the widest and narrowest atom blocks (the wide kernels for an A100, sm_80, too); prints one
line per cubin. Run by tests/test_fused.py in a
process without TRITON_INTERPRET (under it the kernels are interpreted, not compiled)."""

import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from srm_hf import fused, fused_dictionary, fused_dictionary_kernels, fused_kernels, fused_loss, fused_loss_kernels

STRIDES = {"S": "i32", "K": "i32", "s_n": "i32", "s_k": "i32", "s_s": "i32", "per_program": "i32"}
OUT_STRIDES = {"o_n": "i32", "o_k": "i32", "o_s": "i32"}
LOSS_BACKWARD = {"y_ptr": "*i64", "g_ce_ptr": "*fp32", "g_img_ptr": "*fp32", "d_img_ptr": "*fp32", "ds_ptr": "*bf16",
                 "x_ptr": "*bf16", "dl_ptr": "*bf16", "db_ptr": "*fp32", "grad_b_ptr": "*fp32"}
LOSS_OUTPUTS = {"g_ptr": "*fp32", "work_ptr": "*fp32", "d_ptr": "*fp32", "pixel_ptr": "*fp32", "image_ptr": "*fp32",
                "count_ptr": "*i32"}  # the loss forward kernels' image labels, buffers, outputs and counters
STAGE_ONE_BACKWARD = {"codes_ptr": "*bf16", "g_ptr": "*fp32", "x_ptr": "*bf16", "y_ptr": "*bf16", "db_ptr": "*fp32",
                      "grad_b_ptr": "*fp32"}
KERNELS = {  # name -> (signature before the shared stride arguments, constexprs other than the blocks)
    "targets_kernel": ({"a_ptr": "*bf16", "label_ptr": "*i64", "g_ptr": "*fp32", "part_ptr": "*fp32",
                        "count_ptr": "*i32", "num_active": "i32", "chunks": "i32", "scale": "fp32"}, {}),
    "codes_kernel": ({"a_ptr": "*bf16", "out_ptr": "*bf16", "num_active": "i32", **OUT_STRIDES}, {}),
    "loss_forward_kernel": ({"l_ptr": "*bf16", "y_ptr": "*i64", **LOSS_OUTPUTS, "chunks": "i32", "ce_scale": "fp32",
                             "p_scale": "fp32", "eps": "fp32", "image_scale": "fp32"}, {"CE_ON_SIGMOID": True}),
    "loss_backward_kernel": ({"l_ptr": "*fp32", "y_ptr": "*i64", "g_ce_ptr": "*fp32", "g_img_ptr": "*fp32",
                              "d_img_ptr": "*fp32", "out_ptr": "*fp32", **OUT_STRIDES, "ce_scale": "fp32",
                              "p_scale": "fp32"}, {"CE_ON_SIGMOID": False, "PIXEL_TERM": True, "IMAGE_TERM": True}),
}



def kernel_named(name: str):
    """A kernel of `srm_hf.fused_kernels`, `srm_hf.fused_loss_kernels` or `srm_hf.fused_dictionary_kernels`."""
    modules = (fused_kernels, fused_loss_kernels, fused_dictionary_kernels)
    return next(getattr(module, name) for module in modules if hasattr(module, name))


def registers_and_spills(compiled, arch: str = "sm_90a") -> tuple[int, int]:
    """ptxas's register count and spill stores (bytes) for a compiled kernel's PTX."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/kernel.ptx", "w") as f:
            f.write(compiled.asm["ptx"])
        done = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name={arch}", f"{tmp}/kernel.ptx", "-o",
                               f"{tmp}/kernel.o"], capture_output=True, text=True, check=True)
    registers = int(done.stderr.split("Used ")[1].split(" registers")[0])
    return registers, int(done.stderr.split(" bytes spill stores")[0].rsplit(" ", 1)[1])


if __name__ == "__main__":
    for name, (signature, constexprs) in KERNELS.items():
        kernel = kernel_named(name)
        for block_k in (16, 2048):
            meta = {**constexprs, "BLOCK_S": max(1, 4096 // block_k), "BLOCK_K": block_k}
            source = ASTSource(fn=kernel, signature={**signature, **STRIDES, **{k: "constexpr" for k in meta}},
                               constexprs={(kernel.arg_names.index(k),): v for k, v in meta.items()})
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": fused.num_warps(block_k)})
            print(name, block_k, "cubin bytes", len(compiled.asm["cubin"]))
    # the elementwise gradient of the sparse codes (stage 1's backward), bf16 codes and gradients
    kernel, meta = fused_dictionary_kernels.codes_grad_kernel, {"BLOCK": fused.ELEMENTS_PER_PROGRAM}
    source = ASTSource(fn=kernel, signature={"g_ptr": "*bf16", "c_ptr": "*bf16", "out_ptr": "*bf16", "numel": "i64",
                                             "BLOCK": "constexpr"},
                       constexprs={(kernel.arg_names.index("BLOCK"),): meta["BLOCK"]})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    print("codes_grad_kernel", "cubin bytes", len(compiled.asm["cubin"]))
    # stage 1's MSE, forward and backward, on bf16 maps
    for name, signature in (("squared_error_kernel", {"a_ptr": "*bf16", "b_ptr": "*bf16", "part_ptr": "*fp32",
                                                      "out_ptr": "*fp32", "count_ptr": "*i32", "scale": "fp32"}),
                            ("squared_error_grad_kernel", {"g_ptr": "*fp32", "a_ptr": "*bf16", "b_ptr": "*bf16",
                                                           "out_ptr": "*bf16", "scale": "fp32"})):
        kernel = kernel_named(name)
        source = ASTSource(fn=kernel, signature={**signature, "numel": "i64", "BLOCK": "constexpr"},
                           constexprs={(kernel.arg_names.index("BLOCK"),): meta["BLOCK"]})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        print(name, "cubin bytes", len(compiled.asm["cubin"]))
    # the kernels that project the features themselves (tl.dot): the teacher's targets, stage 1's codes, stage 1
    # whole and the student's loss through its head (forward, backward); bf16 features, float32 dictionary or head,
    # at the plans srm_hf picks for the narrowest, a typical and the widest dictionaries they take
    common = {"t_ptr": "*bf16", "s_ptr": "*bf16", "d_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
              **{name: "i32" for name in ("K", "d_c", "d_k", "w_c", "w_k", "S", "C", "s_n", "s_c", "s_s",
                                          "per_program", "chunks", "num_active", *OUT_STRIDES, "o_c")},
              **{name: "fp32" for name in ("scale", "ce_scale", "p_scale", "eps", "image_scale")}, "count_ptr": "*i32"}
    targets = {"label_ptr": "*i64", "g_ptr": "*fp32", "part_ptr": "*fp32"}
    projected = {"projected_targets_kernel": targets, "wide_targets_kernel": targets,
                 "projected_codes_kernel": {"out_ptr": "*bf16"},
                 "dictionary_forward_kernel": {"codes_ptr": "*bf16", "part_ptr": "*fp32", "loss_ptr": "*fp32"},
                 "dictionary_backward_kernel": STAGE_ONE_BACKWARD,
                 "wide_dictionary_forward_kernel": {"codes_ptr": "*bf16", "part_ptr": "*fp32", "loss_ptr": "*fp32"},
                 "wide_dictionary_backward_kernel": STAGE_ONE_BACKWARD,
                 "projected_loss_forward_kernel": {"y_ptr": "*i64", **LOSS_OUTPUTS},
                 "projected_loss_backward_kernel": LOSS_BACKWARD,
                 "wide_loss_forward_kernel": {"y_ptr": "*i64", **LOSS_OUTPUTS, "lse_ptr": "*fp32"},
                 "wide_loss_backward_kernel": {**LOSS_BACKWARD, "lse_ptr": "*fp32"}}
    loss_meta = {f"{kind}_loss_{way}_kernel": {"CE_ON_SIGMOID": True, **({"PIXEL_TERM": True, "IMAGE_TERM": True}
                                                                         if way == "backward" else {})}
                 for kind in ("projected", "wide") for way in ("forward", "backward")}
    for name, own in projected.items():
        kernel = kernel_named(name)
        stage_one = "dictionary_" in name
        widest = fused_dictionary.DICTIONARY_MAX_ATOMS if stage_one else \
            fused_loss.LOSS_MAX_ATOMS if "_loss_" in name else fused.PROJECTED_MAX_ATOMS
        # the wide kernels (a block of atoms at a time: one plan whatever K) also for an A100 (sm_80)
        plans = ((1024, 90), (1024, 80)) if name.startswith("wide_") else ((16, 90), (128, 90), (widest, 90))
        for atoms, arch in plans:
            features, dictionary = torch.empty(128, 64, 56, 56, device="meta"), torch.empty(64, atoms, device="meta")
            if stage_one:
                _, plan = fused_dictionary.dictionary_plan(features, dictionary, 20)
            elif "_loss_" in name:
                _, plan = fused_loss.loss_plan(features, dictionary)
            elif name.startswith("wide_"):
                _, plan = fused.wide_plan(features, dictionary, 20)
            else:
                _, plan = fused.projected_plan(features, dictionary, widest)
            stages = fused_dictionary.STAGES[name.split("_")[-2]] if stage_one else 2
            meta = {**loss_meta.get(name, {}), "PRECISION": "tf32", "BLOCK_S": plan.block_s, "BLOCK_C": fused.DOT_MIN,
                    "BLOCK_K": plan.block_k}
            if "KP" in kernel.arg_names:  # the running top k's slots: the most the wide kernels take
                meta["KP"] = fused.top_slots(fused.WIDE_MAX_ACTIVE)
            signature = {name: "constexpr" if name in meta else own.get(name) or common[name]
                         for name in kernel.arg_names}
            source = ASTSource(fn=kernel, signature=signature,
                               constexprs={(kernel.arg_names.index(k),): v for k, v in meta.items()})
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": plan.warps, "num_stages": stages})
            registers, spills = registers_and_spills(compiled, "sm_90a" if arch == 90 else f"sm_{arch}")
            print(name, atoms, f"sm_{arch}", "shared", compiled.metadata.shared, "registers", registers,
                  "spill stores", spills, "cubin bytes", len(compiled.asm["cubin"]))

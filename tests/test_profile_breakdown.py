"""``profile``: the GEMM / attention / rest split of a block, and ``--model flux2`` / ``wan``.

CPU runs on the tiny configs (the "kernels" are CPU ops with their self time) and synthetic CUDA-like
events for the kernel classification; the GPU test profiles real Wan dims on a small latent."""
import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from fused_dit_ops import profiler  # noqa: E402

from helpers import native_diffusers_backend  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("native_diffusers_backend")


def test_kernel_category_by_op_chain_and_name():
    c = profiler.kernel_category
    # by the launching op
    assert c("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "aten::mm") == "gemm"
    assert c("void cutlass::device_kernel<flash::FlashAttnFwdSm90<...> >", "flash_attn_3::fwd") == "attention"
    assert c("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "aten::_scaled_dot_product_cudnn_attention") == \
        "attention"
    assert c("_swiglu_gemm_kernel", "fused_dit::swiglu_linear") == "gemm"
    assert c("_norm_scale_shift_kernel", "fused_dit::norm_scale_shift") == "rest"
    # inside an attention op: its matmuls are attention (math backend); a memory-bound op of its own is rest
    assert c("ampere_bf16_s16816gemm", "aten::bmm", ["aten::_scaled_dot_product_attention_math",
                                                     "aten::scaled_dot_product_attention"]) == "attention"
    assert c("vectorized_elementwise_kernel", "aten::copy_", ["aten::contiguous", "fused_dit::attention"]) == "rest"
    # a GEMM op enclosing a non-memory-bound op: GEMM (split-K reduction of cuBLAS)
    assert c("splitKreduce_kernel", "", ["aten::mm"]) == "gemm"
    # opaque / unknown ops: by the kernel's name
    assert c("triton_tem_fused_mm_0", "") == "gemm"
    assert c("sm90_xmma_gemm_bf16bf16_bf16f32", "") == "gemm"
    assert c("pytorch_flash::flash_fwd_kernel<...>", "") == "attention"
    assert c("triton_poi_fused_add_mul_0", "") == "rest"
    assert c("triton_red_fused_native_layer_norm_1", "") == "rest"
    assert c("", "aten::native_layer_norm") == "rest"
    # inductor's layout transform in front of SDPA, named after it (kernel name, or its own CPU range)
    assert c("triton_poi_fused__scaled_dot_product_flash_attention_0", "") == "rest"
    assert c("triton_poi_fused__scaled_dot_product_flash_attention_0",
             "triton_poi_fused__scaled_dot_product_flash_attention_0", ["CompiledFxGraph"]) == "rest"
    assert c("triton_tem_fused_addmm_0", "triton_tem_fused_addmm_0") == "gemm"


def _ev(name, start, end, dev="CPU", id=0, linked=0, parent=None):
    from torch.autograd import DeviceType
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           device_type=getattr(DeviceType, dev), id=id, linked_correlation_id=linked,
                           input_shapes=[], input_dtypes=[], thread=1, is_user_annotation=False, activity_type="",
                           cpu_children=[], cpu_parent=parent)


def test_breakdown_of_cuda_like_events():
    mark = _ev(profiler.MARK, 100, 300, id=1)
    attn_op = _ev("fused_dit::attention", 150, 170, id=5, parent=mark)
    copy_op = _ev("aten::copy_", 151, 152, id=6, parent=attn_op)
    events = [
        mark,
        _ev("aten::mm", 110, 120, id=2, parent=mark), _ev("cudaLaunchKernel", 111, 112, id=900, linked=2),
        _ev("nvjet_tst_128x256_h_bz_TNT", 200, 240, dev="CUDA", id=900, linked=2),  # 40 us GEMM
        _ev("fused_dit::norm_scale_shift", 130, 140, id=3, parent=mark),
        _ev("cudaLaunchKernel", 131, 132, id=901, linked=3),
        _ev("_norm_scale_shift_kernel", 240, 250, dev="CUDA", id=901, linked=3),  # 10 us rest
        attn_op, copy_op, _ev("cudaLaunchKernel", 151, 152, id=902, linked=6),
        _ev("vectorized_elementwise_kernel<4, CUDAFunctor_copy>", 250, 255, dev="CUDA", id=902, linked=6),  # 5 rest
        _ev("cuLaunchKernelEx", 160, 161, id=903, linked=5),
        _ev("void cutlass::device_kernel<flash::FlashAttnFwdSm90>", 255, 290, dev="CUDA", id=903, linked=5),  # 35
    ]
    p = profiler.extract_block(events)
    assert [k.category for k in p.kernels] == ["gemm", "rest", "rest", "attention"]
    b = p.breakdown()
    assert b["total_us"] == pytest.approx(90.0)
    assert (b["gemm_us"], b["attention_us"], b["rest_us"]) == pytest.approx((40.0, 35.0, 15.0))
    assert b["rest_pct"] == pytest.approx(100 * 15 / 90)
    assert b["rest_ok"] is False and b["rest_target_pct"] == profiler.REST_TARGET_PCT
    rows = profiler.breakdown_rows([p], ["x"])
    assert rows[0]["config"] == "x" and rows[0]["gemm_pct"] == pytest.approx(100 * 40 / 90)
    text = profiler.format_comparison([p], ["x"], bandwidth=1e12)
    assert "rest = total - GEMM - attention" in text and "NO" in text
    table = profiler.comparison_rows([p], ["x"])
    assert {r["kernel"]: r["class"] for r in table[:-1]}["nvjet_tst_128x256_h_bz_TNT"] == "gemm"
    assert p.to_dict()["breakdown"]["attention_us"] == pytest.approx(35.0)


def _check_doc(doc, names):
    assert doc["names"] == names
    bd = {r["config"]: r for r in doc["breakdown"]}
    assert list(bd) == names
    for n, prof in zip(names, doc["profiles"]):
        r = bd[n]
        assert r["total_us"] == pytest.approx(prof["total_us"]) and r["total_us"] > 0
        assert r["gemm_us"] + r["attention_us"] + r["rest_us"] == pytest.approx(r["total_us"])
        assert r["gemm_pct"] + r["attention_pct"] + r["rest_pct"] == pytest.approx(100.0)
        assert r["gemm_us"] > 0 and r["attention_us"] > 0 and r["rest_us"] > 0
        assert r["rest_ok"] is None  # no verdict on the CPU
        assert prof["breakdown"]["rest_us"] == pytest.approx(r["rest_us"])
        by_cat = {}
        for k in prof["kernels"]:
            by_cat[k["category"]] = by_cat.get(k["category"], 0.0) + k["us"]
        assert by_cat.get("gemm", 0.0) == pytest.approx(r["gemm_us"])
    return bd


@pytest.mark.parametrize("argv,block,names", [
    (["--model", "flux2", "--kind", "double", "--layer", "1"], "transformer_blocks[1]", ["stock", "patched"]),
    (["--model", "flux2", "--kind", "single", "--layer", "3"], "single_transformer_blocks[3]", ["stock", "patched"]),
    (["--model", "wan", "--layer", "1"], "blocks[1]", ["stock", "patched"]),
    (["--model", "wan", "--config", "ti2v-5b", "--b", "patched+nocollapse", "--layer", "0"], "blocks[0]",
     ["stock", "patched+nocollapse"]),
    (["--model", "qwen"], None, ["stock", "patched"]),
])
def test_profile_cli_models_breakdown(tmp_path, capsys, argv, block, names):
    out = tmp_path / "p.json"
    rc = profiler.main(["--device", "cpu", "--layers", "2", "--warmup", "1", "--top", "6", "--json", str(out),
                        "--trace", str(tmp_path / "tr")] + argv)
    assert rc == 0
    text = capsys.readouterr().out
    assert "block time by class" in text and "rest_pct" in text and "TOTAL" in text
    doc = json.loads(out.read_text())
    _check_doc(doc, names)
    if block:
        assert doc["meta"]["block"] == block and block in text
    ops = [{k["op"] for k in p["kernels"]} for p in doc["profiles"]]
    assert not any(o.startswith("fused_dit::") for o in ops[0])
    assert "fused_dit::attention" in ops[1]
    assert len(list((tmp_path / "tr").glob("*.json"))) == 2
    if "wan" in argv:
        assert doc["meta"]["tokens"] == 45 and doc["meta"]["txt_len"] == 7
        ti2v = "ti2v-5b" in argv
        assert doc["meta"]["config"] == ("tiny-ti2v" if ti2v else "tiny")
        assert doc["meta"]["per_token_timestep"] == ti2v
        if ti2v:  # no collapse: the block modulates per token in torch, no fused modulation op
            assert not any(o.startswith("fused_dit::norm_scale_shift") for o in ops[1])
            assert "timestep_collapse=False" in doc["profiles"][1]["meta"]["patch"]


def test_profile_wan_ti2v_collapsed_uses_the_modulation_ops(tmp_path):
    profiles, names, meta = profiler.run_profile("stock", "patched", model="wan", config="ti2v-5b", layers=2,
                                                 layer=1, warmup=1, device="cpu")
    assert meta["per_token_timestep"] and names == ["stock", "patched"]
    ops = {k.op for k in profiles[1].kernels}
    assert "fused_dit::gate_residual_norm_scale_shift" in ops


def test_profile_bad_arguments():
    with pytest.raises(SystemExit):
        profiler.run_profile(model="flux2", kind="single", layers=1, layer=2, device="cpu")
    with pytest.raises(SystemExit):
        profiler.run_profile(model="wan", config="edit-2511", layers=1, layer=0, device="cpu")
    with pytest.raises(SystemExit):
        profiler.run_profile(model="wan", layers=2, layer=2, device="cpu")
    with pytest.raises(SystemExit):
        profiler.run_profile(model="wan", layers=2, layer=0, tokens="45", device="cpu")
    with pytest.raises(ValueError):
        profiler.run_profile("stock", "patched+fast", model="wan", layers=1, layer=0, device="cpu")
    with pytest.raises(SystemExit):
        profiler.main(["--device", "cpu", "--model", "sd3"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_wan_real_dims_small_latent_gpu(tmp_path):
    out = tmp_path / "p.json"
    assert profiler.main(["--model", "wan", "--config", "ti2v-5b", "--layers", "2", "--layer", "1",
                          "--tokens", "3,22,40", "--warmup", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    for r in doc["breakdown"]:
        assert r["gemm_us"] > 0 and r["attention_us"] > 0
        assert r["gemm_us"] + r["attention_us"] + r["rest_us"] == pytest.approx(r["total_us"])
        assert r["rest_ok"] in (True, False)

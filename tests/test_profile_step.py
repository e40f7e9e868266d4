"""benchmarks/profile_step.py's HLO reading (source ops and matmul marks of instructions) and
the benchmarks' --set parsing."""

import pytest
from absl import app

from benchmarks import profile_step
from benchmarks.common import parse_overrides

_MM = "jit(step)/transpose(jvp(Transformer))/Transformer.hidden/block_3/mlp/up/dot_general"
_EXP = "jit(step)/jvp(Transformer)/block_0/attn/while/body/closed_call/exp"
_HLO = """\
HloModule jit_step

%fused_dot (p0: f32[8,4], p1: f32[4,2]) -> f32[8,2] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_exp (p0: f32[8,2]) -> f32[8,2] {
  %p0 = f32[8,2]{1,0} parameter(0)
  ROOT %exp.1 = f32[8,2]{1,0} exponential(%p0)
}

ENTRY %main (a: f32[8,4], b: f32[4,2]) -> f32[8,2] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,2]{1,0} parameter(1)
  %ynn_fusion.3 = f32[8,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, \
metadata={op_name="MM"}
  ROOT %loop_fusion = f32[8,2]{1,0} fusion(%ynn_fusion.3), kind=kLoop, calls=%fused_exp, \
metadata={op_name="EXP"}
  %add.7 = f32[8,2]{1,0} add(%a, %a), metadata={op_name="jit(step)/add"}
}
""".replace("MM", _MM).replace("EXP", _EXP)


def test_parse_hlo_names_source_ops_and_marks_matmuls():
  ops = profile_step.parse_hlo(_HLO)
  assert ops["ynn_fusion.3"] == ("mlp/up/dot_general", True)
  assert ops["loop_fusion"] == ("attn/exp", False)
  assert ops["add.7"] == ("step/add", False)
  assert ops["dot.1"] == ("dot.1", True)  # no metadata: its own name


def test_set_overrides_are_key_value_pairs():
  assert parse_overrides(["model.attention.impl=xla", "a=b=c"]) == {
      "model.attention.impl": "xla", "a": "b=c"}
  with pytest.raises(app.UsageError, match="key=value, got oops"):
    parse_overrides(["oops"])

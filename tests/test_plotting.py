"""KAN network figure: every edge's curve drawn at opacity tanh(3 * score), written as a PNG."""

import jax
import numpy as np
import pytest

pytest.importorskip("matplotlib")  # the optional `plot` extra

from jaxtricks import plotting  # noqa: E402
from jaxtricks.models.kan import KAN, init_variables  # noqa: E402
from jaxtricks.models.kan_prune import attribution  # noqa: E402


def test_edge_alphas_follow_pykan():
  scores = np.array([[0.0, 0.1], [1.0, -0.2]])
  np.testing.assert_allclose(plotting.edge_alphas(scores),
                             [[0.0, np.tanh(0.3)], [np.tanh(3.0), 0.0]], rtol=1e-12)


def test_plot_kan_draws_every_edge_of_a_network(tmp_path, monkeypatch):
  model = KAN((2, 3, 1), grid_size=4)
  variables = init_variables(model, jax.random.key(0))
  x = np.random.default_rng(0).uniform(-1, 1, (64, 2)).astype(np.float32)
  _, inputs, edges = model.apply(variables, x, return_edges=True)
  scores = attribution(model, variables, x)[1]
  insets = []
  real_inset = plotting.plt.Axes.inset_axes
  monkeypatch.setattr(plotting.plt.Axes, "inset_axes",
                      lambda self, *a, **k: insets.append(real_inset(self, *a, **k)) or insets[-1])
  path = plotting.plot_kan([np.asarray(a) for a in inputs], [np.asarray(e) for e in edges],
                           scores, str(tmp_path / "kan.png"), in_names=("x", "y"))
  assert path == str(tmp_path / "kan.png")
  assert (tmp_path / "kan.png").read_bytes()[:4] == b"\x89PNG"
  assert len(insets) == 2 * 3 + 3 * 1  # one curve per edge
  curve = insets[0].lines[0]  # edge (o=0, i=0): phi against sorted x at its score's opacity
  np.testing.assert_allclose(curve.get_xdata(), np.sort(x[:, 0]))
  assert curve.get_alpha() == pytest.approx(float(np.tanh(3 * scores[0][0, 0])))

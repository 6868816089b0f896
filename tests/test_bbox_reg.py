import numpy as np
import torch

from spp_cli.bbox_reg import decode, encode, fit_ridge


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (20, 2))
    proposals = np.concatenate([xy, xy + rng.uniform(5, 50, (20, 2))], 1).astype(np.float32)
    xy = rng.uniform(0, 100, (20, 2))
    targets = np.concatenate([xy, xy + rng.uniform(5, 50, (20, 2))], 1).astype(np.float32)
    out = decode(torch.from_numpy(proposals), torch.from_numpy(encode(proposals, targets)))
    np.testing.assert_allclose(out.numpy(), targets, rtol=1e-4, atol=1e-3)


def _slow_ridge(x, y, lam):
    """Ridge with an unpenalised bias via the augmented normal equations."""
    xa = np.concatenate([x, np.ones((len(x), 1))], 1)
    penalty = lam * np.eye(xa.shape[1])
    penalty[-1, -1] = 0
    beta = np.linalg.solve(xa.T @ xa + penalty, xa.T @ y)
    return beta[:-1], beta[-1]


def test_ridge_primal_and_dual_forms_match_reference():
    rng = np.random.default_rng(1)
    for n, d in ((200, 30), (20, 60)):  # more samples than features, and fewer
        x = rng.standard_normal((n, d))
        y = x @ rng.standard_normal((d, 4)) + 0.1 * rng.standard_normal((n, 4)) + 3.0
        w, b = fit_ridge(x, y, 5.0)
        w_ref, b_ref = _slow_ridge(x, y, 5.0)
        np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b, b_ref, rtol=1e-4, atol=1e-5)


def test_ridge_with_one_target_column_matches_reference():
    # Localisation quality fits one column (the IoU) with the same solver.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((150, 25))
    y = x @ rng.standard_normal((25, 1)) + 0.1 * rng.standard_normal((150, 1)) + 0.4
    w, b = fit_ridge(x, y, 10.0)
    w_ref, b_ref = _slow_ridge(x, y, 10.0)
    assert w.shape == (25, 1) and b.shape == (1,)
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, b_ref, rtol=1e-4, atol=1e-5)


def test_iou_predictions_match_a_per_class_product():
    from spp_cli.bbox_reg import IoURegressors

    rng = np.random.default_rng(6)
    reg = IoURegressors(rng.standard_normal((3, 7)).astype(np.float32), rng.standard_normal(3).astype(np.float32))
    x = rng.standard_normal((5, 7)).astype(np.float32)
    expected = np.array([[0.5 * x[i] @ reg.weight[k] + reg.bias[k] for k in range(3)] for i in range(5)])
    np.testing.assert_allclose(reg.predict_all(torch.from_numpy(x), scale=0.5).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_ridge_takes_fp16_rows_and_degenerate_sets():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 40)).astype(np.float16)
    y = x.astype(np.float64) @ rng.standard_normal((40, 4)) + 0.5
    w, b = fit_ridge(x, y, 1000.0)
    w_ref, b_ref = _slow_ridge(x.astype(np.float64), y, 1000.0)
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b, b_ref, rtol=1e-4, atol=1e-6)
    # One window, or identical ones: nothing to regress on, the bias is the mean delta.
    for rows in (1, 5):
        w, b = fit_ridge(np.ones((rows, 8), np.float32), np.full((rows, 4), 0.25), 1000.0)
        assert not w.any() and np.allclose(b, 0.25)


def test_predict_matches_per_class_product():
    from spp_cli.bbox_reg import BoxRegressors

    rng = np.random.default_rng(2)
    reg = BoxRegressors(rng.standard_normal((3, 7, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((5, 7)).astype(np.float32))
    cls = torch.tensor([0, 2, 1, 2, 0])
    expected = torch.stack([x[i] @ torch.from_numpy(reg.weight[c]) + torch.from_numpy(reg.bias[c]) for i, c in enumerate(cls.tolist())])
    torch.testing.assert_close(reg.predict(x, cls), expected, rtol=1e-5, atol=1e-5)
    assert reg.predict_all(x).shape == (5, 3, 4)
    # Its (D, K * 4) matrix is made once, and made again for weights put in its place.
    reg.weight = rng.standard_normal((3, 7, 4)).astype(np.float32)
    expected = torch.stack([x[i] @ torch.from_numpy(reg.weight[c]) + torch.from_numpy(reg.bias[c]) for i, c in enumerate(cls.tolist())])
    torch.testing.assert_close(reg.predict(x, cls), expected, rtol=1e-5, atol=1e-5)

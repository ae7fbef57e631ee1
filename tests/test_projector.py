import pytest
import torch

from svlm.models.projector import MLPProjector, ProjectorConfig, Resampler, build_projector, compress_grid


def test_pixel_shuffle_groups_neighbouring_patches():
    B, g, r = 2, 6, 3
    # patch (row y, column x) of image b holds the values (b, y, x)
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    grid = torch.stack([torch.zeros(g, g, dtype=torch.long), ys, xs], dim=-1).reshape(g * g, 3)
    x = torch.stack([grid + torch.tensor([b, 0, 0]) for b in range(B)]).float()  # (B, P, 3)
    out = compress_grid(x, "pixel_shuffle", r)
    n = g // r
    assert out.shape == (B, n * n, r * r * 3)
    for b in range(B):
        for token in range(n * n):
            ty, tx = divmod(token, n)  # tokens in reading order
            patches = out[b, token].reshape(r * r, 3)
            assert set(patches[:, 0].long().tolist()) == {b}
            got = {(int(y), int(x)) for _, y, x in patches}
            want = {(ty * r + dy, tx * r + dx) for dy in range(r) for dx in range(r)}
            assert got == want, (token, got, want)
            # within a token the patches are in reading order too
            assert [(int(y), int(x)) for _, y, x in patches] == sorted(want)


def test_avg_pool_averages_the_block():
    B, g, r, C = 1, 4, 2, 5
    x = torch.randn(B, g * g, C)
    out = compress_grid(x, "avg_pool", r)
    assert out.shape == (B, (g // r) ** 2, C)
    grid = x.reshape(B, g, g, C)
    # token 1 is the top-right 2x2 block
    torch.testing.assert_close(out[0, 1], grid[0, 0:2, 2:4].reshape(-1, C).mean(0))
    torch.testing.assert_close(out[0, 2], grid[0, 2:4, 0:2].reshape(-1, C).mean(0))


def test_none_and_factor_one_are_identity():
    x = torch.randn(2, 16, 4)
    assert compress_grid(x, "none", 2) is x
    assert compress_grid(x, "pixel_shuffle", 1) is x


@pytest.mark.parametrize("patches", [15, 36])  # not square / not divisible by 4
def test_bad_grid_raises(patches):
    with pytest.raises(ValueError, match="cannot compress"):
        compress_grid(torch.randn(1, patches, 4), "pixel_shuffle", 4 if patches == 36 else 2)


@pytest.mark.parametrize(
    ("compress", "tokens", "feat"),
    [("none", 64, 16), ("pixel_shuffle", 16, 64), ("avg_pool", 16, 16)],
)
def test_mlp_projector_shapes(compress, tokens, feat):
    proj = build_projector(ProjectorConfig(kind="mlp", compress=compress, factor=2), 16, 40, 64)
    assert isinstance(proj, MLPProjector)
    assert proj.num_tokens == tokens
    assert proj.fc1.in_features == feat
    assert proj(torch.randn(3, 64, 16)).shape == (3, tokens, 40)


def test_resampler_shape():
    proj = build_projector(ProjectorConfig(kind="resampler", queries=7, heads=4), 16, 40, 64)
    assert isinstance(proj, Resampler)
    assert proj.num_tokens == 7
    out = proj(torch.randn(3, 64, 16))
    assert out.shape == (3, 7, 40)
    out.sum().backward()
    assert proj.queries.grad is not None and proj.queries.grad.abs().sum() > 0


def test_resampler_heads_must_divide_width():
    with pytest.raises(ValueError, match="model.projector.heads"):
        build_projector(ProjectorConfig(kind="resampler", heads=5), 16, 40, 64)


def test_projector_config_validation():
    with pytest.raises(ValueError, match="model.projector.factor"):
        ProjectorConfig(factor=0)
    with pytest.raises(ValueError, match="model.projector.queries"):
        ProjectorConfig(kind="resampler", queries=0)

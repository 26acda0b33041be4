"""The counter-based noise of the sampler step: Philox known answers and the statistics of the normals."""

import torch

from fastdiff.reference import STREAM_INIT, philox4x32, philox_normal, sampler_step


def _words(*vals):
    return [torch.tensor([v], dtype=torch.int64) for v in vals]


def test_philox_known_answers():
    # Known-answer vectors of Random123 (kat_vectors, philox4x32 with 10 rounds).
    cases = [
        ((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 6, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for inputs, expected in cases:
        out = tuple(int(w) for w in philox4x32(*_words(*inputs)))
        assert out == expected


def test_normals_are_standard_and_uncorrelated():
    seeds = torch.arange(256)
    z = philox_normal(seeds, 3, 1000)
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    # Fourth moment of a standard normal is 3 (catches a wrong Box-Muller).
    assert abs((z**4).mean().item() - 3) < 0.1
    # Across elements, samples, steps and streams.
    other_step = philox_normal(seeds, 4, 1000)
    other_stream = philox_normal(seeds, 3, 1000, stream=STREAM_INIT)
    for a, b in [(z[:, :-1], z[:, 1:]), (z[:-1], z[1:]), (z, other_step), (z, other_stream)]:
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(corr.item()) < 5 / a.numel() ** 0.5


def test_noise_is_a_function_of_seed_step_element():
    a = philox_normal(torch.tensor([7, 8, 9]), 5, 37)
    b = philox_normal(torch.tensor([9, 7]), 5, 37)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert torch.equal(philox_normal(torch.tensor([7]), torch.tensor(5), 37)[0], a[0])
    # A longer sample shares its prefix: element e of a sample never depends on the sample size.
    assert torch.equal(philox_normal(torch.tensor([7]), 5, 40)[0, :37], a[0])
    big_seed = philox_normal(torch.tensor([2**40 + 7]), 5, 37)
    assert not torch.equal(big_seed[0], a[0])


def test_sampler_step_formula_without_noise():
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    p, q, A, B = (torch.rand(3, generator=g) for _ in range(4))
    zero = torch.zeros(3)
    x_prev, x0 = sampler_step(x, out, p, q, A, B, zero, torch.arange(3), 0, clip=0.5, return_x0=True)
    v = lambda c: c.view(-1, 1, 1, 1)  # noqa: E731
    ref_x0 = (v(p) * x + v(q) * out).clamp(-0.5, 0.5)
    torch.testing.assert_close(x0, ref_x0)
    torch.testing.assert_close(x_prev, v(A) * ref_x0 + v(B) * x)


def test_sampler_step_noise_ignores_memory_format():
    x = torch.randn(2, 3, 4, 5)
    ones, zero = torch.ones(2), torch.zeros(2)
    a = sampler_step(x, x, zero, zero, zero, zero, ones, torch.tensor([1, 2]), 9)
    b = sampler_step(x.to(memory_format=torch.channels_last), x, zero, zero, zero, zero, ones, torch.tensor([1, 2]), 9)
    torch.testing.assert_close(a, b)

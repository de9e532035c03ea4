"""The arrival process: deterministic per seed, the rate and the length ranges as asked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from d2moe.core.errors import UserError
from d2moe.serve.arrivals import ArrivalConfig, make_requests, parse_range


def test_same_seed_same_requests_other_seed_others():
    cfg = ArrivalConfig(rate=10, requests=50, prompt_tokens="4:32", output_tokens="2:9", seed=3)
    assert make_requests(cfg) == make_requests(cfg)
    assert make_requests(cfg) != make_requests(ArrivalConfig(**{**cfg.__dict__, "seed": 4}))


def test_rate_and_ranges_roughly_right_over_many_draws():
    rate, n = 40.0, 4000
    reqs = make_requests(ArrivalConfig(rate=rate, requests=n, prompt_tokens="4:8",
                                       output_tokens="3", seed=0))
    arrivals = np.array([r.arrival_us for r in reqs])
    gaps = np.diff(np.r_[0.0, arrivals])
    assert (gaps >= 0).all() and [r.id for r in reqs] == list(range(n))
    # mean gap 1/rate: the sample mean of 4000 exponentials is within 3 sd (1.6%) w.h.p.
    assert abs(gaps.mean() * rate / 1e6 - 1) < 0.08
    assert abs(n / (arrivals[-1] / 1e6) / rate - 1) < 0.08
    prompts = [r.prompt_tokens for r in reqs]
    assert min(prompts) == 4 and max(prompts) == 8
    assert {r.output_tokens for r in reqs} == {3}


def test_infinite_rate_puts_every_arrival_at_zero():
    reqs = make_requests(ArrivalConfig(rate=math.inf, requests=5))
    assert [r.arrival_us for r in reqs] == [0.0] * 5


@pytest.mark.parametrize("text", ["0", "5:3", "a", "1:2:3", "", "-2:4"])
def test_bad_ranges_are_user_errors(text):
    with pytest.raises(UserError, match="prompt_tokens"):
        parse_range(text, "prompt_tokens")
    with pytest.raises(UserError, match="output_tokens"):
        ArrivalConfig(output_tokens=text)


@pytest.mark.parametrize("kw", [{"rate": 0}, {"rate": -1}, {"rate": math.nan}, {"requests": 0},
                                {"seed": -1}])
def test_bad_config_is_a_user_error(kw):
    with pytest.raises(UserError, match=next(iter(kw))):
        ArrivalConfig(**kw)


def test_ranges_parse():
    assert parse_range("7", "x") == (7, 7)
    assert parse_range("2:9", "x") == (2, 9)

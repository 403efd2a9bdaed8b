"""nano_gtalign/steering.py: pricing policies on hand-computed matrices, and the two-stage
generation driven by a stub sampler (which tokens it is asked to continue from)."""
import json
import math
import random
from types import SimpleNamespace

import pytest

from nano_gtalign import game, steering
from nano_gtalign.sampling import SamplingParams
from nano_gtalign.tokenizer import Tokenizer
from tests.tiny import make_tokenizer

# The model's matrix. Frontier: DQ_AQ (2, 3) and DQ_DA (3, 2.5); Cobb-Douglas 6 vs 7.5 -> DQ_DA.
M = {"DQ_AQ": (2.0, 3.0), "DQ_CQ": (1.0, 1.5), "DQ_DA": (3.0, 2.5),
     "VQ_AQ": (1.5, 2.0), "VQ_CQ": (0.5, 1.0), "VQ_DA": (2.0, 0.5)}
THINKING = "<thinking>The question is clear; a direct answer is cheap and safe.</thinking>\n"
MESSAGES = [{"role": "system", "content": "Reply in four blocks."}, {"role": "user", "content": "What is 37 + 48?"}]


def full_completion(matrix_text: str) -> str:
    return (THINKING + "<payoff>" + matrix_text + "</payoff><analyze>Frontier DQ_AQ, DQ_DA. Choose DQ_DA.</analyze>"
            "<response>85</response>")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok")))


class StubSampler:
    """Plays back scripted completions, cut after the first stop string as the real sampler does,
    and records every (prompt ids, params) it was called with."""

    def __init__(self, *scripts):
        self.scripts, self.calls = list(scripts), []

    def __call__(self, model, tokenizer, prompts, params, num_samples=1, generator=None):
        assert model == "stub-model" and len(prompts) == 1 and num_samples == 1
        self.calls.append((list(prompts[0]), params))
        text = self.scripts[len(self.calls) - 1]
        hits = [text.find(s) + len(s) for s in params.stop_strings if s in text]
        if hits:
            return SimpleNamespace(texts=[text[: min(hits)]], finish_reasons=["stop"])
        return SimpleNamespace(texts=[text], finish_reasons=["eos"])


def test_upstream_llm_price():
    priced = steering.parse_pricing("upstream-llm:1.5").apply(M)
    # LLM +1.5 everywhere; user +1 AQ, +0.5 CQ, +0 DA
    assert priced == {"DQ_AQ": (3.5, 4.0), "DQ_CQ": (2.5, 2.0), "DQ_DA": (4.5, 2.5),
                      "VQ_AQ": (3.0, 3.0), "VQ_CQ": (2.0, 1.5), "VQ_DA": (3.5, 0.5)}
    assert game.pareto_frontier(priced) == ["DQ_AQ", "DQ_DA"]
    # sqrt(3.5 * 4) = 3.74 beats sqrt(4.5 * 2.5) = 3.35: the price moves the choice from DA to AQ
    assert game.choose_action(M, "cobb_douglas") == "DQ_DA"
    assert game.choose_action(priced, "cobb_douglas") == "DQ_AQ"


def test_upstream_user_price():
    priced = steering.parse_pricing("upstream-user:1").apply(M)
    # user +1 everywhere; LLM +1 DA, +0.5 AQ, +0 CQ
    assert priced == {"DQ_AQ": (2.5, 4.0), "DQ_CQ": (1.0, 2.5), "DQ_DA": (4.0, 3.5),
                      "VQ_AQ": (2.0, 3.0), "VQ_CQ": (0.5, 2.0), "VQ_DA": (3.0, 1.5)}
    assert game.choose_action(priced, "cobb_douglas") == "DQ_DA"  # 4 * 3.5 = 14 > 2.5 * 4 = 10


def test_token_price_user_pays():
    policy = steering.parse_pricing("token:per_1k=5,payer=user,DA=600,CQ=40,AQ=700")
    assert policy == steering.TokenPrice(5.0, "user", {"DA": 600.0, "CQ": 40.0, "AQ": 700.0})
    priced = policy.apply(M)
    # costs to the user: DA 5*600/1000 = 3.0, CQ 0.2, AQ 3.5
    assert priced == {"DQ_AQ": (2.0, -0.5), "DQ_CQ": (1.0, 1.3), "DQ_DA": (3.0, -0.5),
                      "VQ_AQ": (1.5, -1.5), "VQ_CQ": (0.5, 0.8), "VQ_DA": (2.0, -2.5)}
    assert game.pareto_frontier(priced) == ["DQ_CQ", "DQ_DA"]
    # shifted by the minimum -2.5: CQ (3.5, 3.8) -> 13.3 beats DA (5.5, 2.0) -> 11
    assert game.choose_action(priced, "cobb_douglas") == "DQ_CQ"


def test_token_price_service_pays_with_default_tokens():
    policy = steering.parse_pricing("token:per_1k=2,payer=llm")
    assert policy.tokens == {"DA": 300, "CQ": 60, "AQ": 360}
    # LLM loses 0.6 (DA), 0.12 (CQ), 0.72 (AQ); the user is untouched
    assert policy.apply(M) == {"DQ_AQ": (1.28, 3.0), "DQ_CQ": (0.88, 1.5), "DQ_DA": (2.4, 2.5),
                               "VQ_AQ": (0.78, 2.0), "VQ_CQ": (0.38, 1.0), "VQ_DA": (1.4, 0.5)}
    assert steering.parse_pricing("none").apply(M) == M


@pytest.mark.parametrize("spec", ["upstream-llm:0", "upstream-llm:-0", "upstream-llm:0.0", "upstream-user:0"])
def test_upstream_price_zero_leaves_the_matrix_unchanged(spec):
    # upstream's transform shifts nothing when the price is 0: no user (or LLM) bonus either
    policy = steering.parse_pricing(spec)
    priced = policy.apply(M)
    assert priced == M and priced is not M
    assert "the matrix is unchanged" in policy.describe()
    # a price just off 0 does add the bonuses (user +1 on AQ, +0.5 on CQ)
    near = steering.parse_pricing("upstream-llm:0.1").apply(M)
    assert near["DQ_AQ"] == (2.1, 4.0) and near["DQ_CQ"] == (1.1, 2.0) and near["DQ_DA"] == (3.1, 2.5)


def test_steer_upstream_llm_zero_keeps_the_models_choice(tokenizer):
    sampler = StubSampler(full_completion(game.format_payoff(M)), "85</response>")
    r = steering.steer("stub-model", tokenizer, MESSAGES, steering.parse_pricing("upstream-llm:0"),
                       SamplingParams(max_new_tokens=20, temperature=0), generate_fn=sampler)
    assert r.payoff_priced == r.payoff_raw == M and r.action_priced == r.action_raw == "DQ_DA"


def _random_matrix(rng: random.Random, lo: float, hi: float) -> game.Matrix:
    """Six cells of one-decimal payoffs drawn uniformly from [lo, hi], as a model writes them."""
    return {k: (round(rng.uniform(lo, hi), 1) + 0.0, round(rng.uniform(lo, hi), 1) + 0.0) for k in game.KEYS}


def disagreement(lo: float, hi: float, seed: int, n: int = 2000, spec: str = "upstream-llm:-2") -> tuple[float, float]:
    """Over n seeded random matrices repriced by spec, the share where upstream's product rule and the
    sign-safe default choose a different cell, and a different strategy."""
    price, draws, ties = steering.parse_pricing(spec), random.Random(seed), random.Random(seed + 1)
    cells = strategies = 0
    for _ in range(n):
        priced = price.apply(_random_matrix(draws, lo, hi))
        ours, upstream = game.choose_action(priced, "cobb_douglas"), game.choose_action(priced, "product", rng=ties)
        cells += ours != upstream
        strategies += ours.split("_")[1] != upstream.split("_")[1]
    return cells / n, strategies / n


@pytest.mark.parametrize("lo, hi, cells, strategies", [
    (-5.0, 5.0, 0.7780, 0.6190),   # the published prompt's whole scale
    (-2.0, 5.0, 0.2280, 0.1795),   # mostly positive, some costs
    (0.0, 5.0, 0.0600, 0.0455),    # no negatives until the price makes them
])
def test_product_and_sign_safe_disagree_at_price_llm_minus_2(lo, hi, cells, strategies):
    # docs/steering.md quotes these numbers (seed 0); another seed lands within 3 points: a stable rate
    for seed in (0, 1):
        got = disagreement(lo, hi, seed)
        if seed == 0:
            assert got == pytest.approx((cells, strategies), abs=1e-9)  # 2000 matrices: exact
        assert got == pytest.approx((cells, strategies), abs=0.03)
    assert cells >= 0.05   # sizeable in every case: the rules are not interchangeable


@pytest.mark.parametrize("spec, message", [
    ("upstream-llm", "needs a price"),
    ("upstream-llm:abc", "the price S must be a number, got 'abc'"),
    ("upstream-user:inf", "must be finite"),
    ("token:payer=user", "needs per_1k"),
    ("token:per_1k=2,payer=bank", "payer must be 'user' or 'llm', got 'bank'"),
    ("token:per_1k=2,XX=3", "unknown token-price field 'XX'"),
    ("token:per_1k=-1", "per_1k must be >= 0"),
    ("token:per_1k=1,CQ=lots", "expected tokens for CQ must be a number, got 'lots'"),
    ("token:per_1k", "'per_1k' must be KEY=VALUE"),
    ("discount:3", "unknown policy 'discount'"),
    ("none:1", "takes no argument"),
])
def test_bad_specs_name_the_bad_part(spec, message):
    with pytest.raises(steering.PricingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        steering.parse_pricing(spec)



@pytest.mark.parametrize("spec, named", [
    ("token:per_1k=1e308", "token:per_1k=1e+308"),                  # 1e308 * 300 tokens overflows
    ("token:per_1k=1e300,payer=llm,AQ=1e300", "AQ=1e+300"),
    ("token-price:per_1k=2,CQ=1e308,DA=1e308", "DA=1e+308"),
])
def test_price_whose_effect_is_not_finite_is_refused_naming_it(spec, named):
    with pytest.raises(steering.PricingError) as e:
        steering.parse_pricing(spec)
    msg = str(e.value)
    assert spec in msg and "not finite" in msg and named in msg, msg


def test_apply_refuses_a_repriced_cell_that_is_not_finite():
    huge = {k: (1.7976e308, -1.7976e308) for k in game.KEYS}   # the largest float is 1.7977e308
    for spec, where in [("upstream-llm:1e308", "LLM"), ("upstream-user:-1e308", "user"),
                        ("token:per_1k=1e305,payer=user", "user")]:   # the user pays 3e304 for DA
        policy = steering.parse_pricing(spec)   # a finite effect: fine on an honest matrix
        assert all(math.isfinite(x) for cell in policy.apply(M).values() for x in cell)
        with pytest.raises(steering.PricingError) as e:
            policy.apply(huge)
        msg = str(e.value)
        assert "not finite" in msg and "DQ_AQ" in msg and where in msg and spec.split(":")[0] in msg, msg
    with pytest.raises(steering.PricingError, match="not finite"):
        steering.NoPrice().apply({**M, "VQ_DA": (float("inf"), 0.0)})


def test_steer_stops_cleanly_when_repricing_overflows(tokenizer):
    huge = {k: (1.7e308, 1.0) for k in game.KEYS}
    sampler = StubSampler(full_completion(game.format_payoff(huge)), "85</response>")
    r = steering.steer("stub-model", tokenizer, MESSAGES, steering.parse_pricing("upstream-llm:1e308"),
                       SamplingParams(max_new_tokens=20, temperature=0), generate_fn=sampler)
    assert len(sampler.calls) == 1 and r.payoff_raw == huge and r.payoff_priced is None and r.response is None
    assert r.error.startswith("repricing failed:") and "upstream-llm:1e+308" in r.error and "not finite" in r.error

def test_steer_continues_the_same_generation(tokenizer):
    sampler = StubSampler(full_completion(game.format_payoff(M)), "Sure: 85. Want the steps?</response>ignored")
    params = SamplingParams(max_new_tokens=50, temperature=0.7, top_p=0.9, stop_strings=("user stop",), seed=3)
    r = steering.steer("stub-model", tokenizer, MESSAGES, steering.parse_pricing("upstream-llm:1.5"), params,
                       generate_fn=sampler)
    assert r.error is None
    (ids1, p1), (ids2, p2) = sampler.calls
    assert ids1 == tokenizer.encode_chat(MESSAGES)
    assert p1 == SamplingParams(max_new_tokens=50, temperature=0.7, top_p=0.9, stop_strings=("</payoff>",), seed=3)
    assert p2.stop_strings == ("</response>",) and p2.temperature == 0.7
    expected_context = (
        THINKING
        + '<payoff>{"DQ_AQ": {"LLM": 3.5, "user": 4.0}, "DQ_CQ": {"LLM": 2.5, "user": 2.0}, '
        '"DQ_DA": {"LLM": 4.5, "user": 2.5}, "VQ_AQ": {"LLM": 3.0, "user": 3.0}, '
        '"VQ_CQ": {"LLM": 2.0, "user": 1.5}, "VQ_DA": {"LLM": 3.5, "user": 0.5}}</payoff>'
        "<analyze>Frontier: DQ_AQ, DQ_DA. Chosen: DQ_AQ, the largest LLM x user.</analyze>"
        "<response>"
    )
    # the continuation is asked for from the prompt + the model's thinking + our rewritten blocks
    assert ids2[: len(ids1)] == ids1
    assert tokenizer.decode(ids2) == tokenizer.apply_chat_template(MESSAGES) + expected_context
    assert (r.action_raw, r.action_priced) == ("DQ_DA", "DQ_AQ")
    assert (r.frontier_raw, r.frontier_priced) == (["DQ_AQ", "DQ_DA"], ["DQ_AQ", "DQ_DA"])
    assert r.payoff_raw == M and r.payoff_priced["DQ_AQ"] == (3.5, 4.0)
    assert r.response == "Sure: 85. Want the steps?"
    assert r.text == expected_context + "Sure: 85. Want the steps?</response>"
    # the rewritten completion is itself a valid, Pareto-consistent four-block answer
    assert game.format_ok(r.text) and game.pareto_consistency(r.text) == 1.0
    assert game.analyze_choice(game.split_blocks(r.text).analyze) == "DQ_AQ"
    out = r.to_json()
    assert json.loads(json.dumps(out))["payoff_priced"]["DQ_AQ"] == {"LLM": 3.5, "user": 4.0}
    assert {"payoff_raw", "payoff_priced", "action_raw", "action_priced", "response", "text"} <= set(out)
    table = steering.format_side_by_side(r)
    assert table.splitlines()[2] == "DQ_AQ        2       3 *       3.5       4 *<"
    assert table.splitlines()[4] == "DQ_DA        3     2.5 *<      4.5     2.5 *"
    assert table.splitlines()[5] == "VQ_AQ      1.5       2           3       3"
    assert "frontier after:  DQ_AQ, DQ_DA   chosen: DQ_AQ" in table


def test_sign_safe_choice_after_repricing(tokenizer):
    # A price of -3 on the LLM side drives every payoff negative.
    raw = {"DQ_AQ": (2.5, -5.0), "DQ_CQ": (-1.0, -4.5), "DQ_DA": (2.0, -1.0),
           "VQ_AQ": (-1.0, -5.0), "VQ_CQ": (-1.0, -4.5), "VQ_DA": (-1.0, -4.0)}
    sampler = StubSampler(full_completion(game.format_payoff(raw)), "85</response>")
    r = steering.steer("stub-model", tokenizer, MESSAGES, steering.parse_pricing("upstream-llm:-3"),
                       SamplingParams(max_new_tokens=20, temperature=0), generate_fn=sampler)
    assert r.payoff_priced == {"DQ_AQ": (-0.5, -4.0), "DQ_CQ": (-4.0, -4.0), "DQ_DA": (-1.0, -1.0),
                               "VQ_AQ": (-4.0, -4.0), "VQ_CQ": (-4.0, -4.0), "VQ_DA": (-4.0, -4.0)}
    # upstream's raw product l*u ranks the dominated (-4, -4) cells first (16) and DQ_DA last (1)
    products = {k: l * u for k, (l, u) in r.payoff_priced.items()}
    assert max(products.values()) == 16.0 and products["DQ_DA"] == 1.0
    # ours: frontier DQ_AQ (-0.5, -4), DQ_DA (-1, -1); shifted by -4: (3.5, 0) -> 0 vs (3, 3) -> 3
    assert r.frontier_priced == ["DQ_AQ", "DQ_DA"]
    assert r.action_priced == "DQ_DA" and r.error is None
    assert "Chosen: DQ_DA, the largest LLM x user.</analyze><response>" in tokenizer.decode(sampler.calls[1][0])


def test_steer_rule_product_is_upstreams_choice(tokenizer):
    # the matrix of test_sign_safe_choice_after_repricing: at upstream-llm:-3 four dominated (-4, -4)
    # cells tie at the largest raw product, 16; their strategies in matrix order: CQ, AQ, DA
    raw = {"DQ_AQ": (2.5, -5.0), "DQ_CQ": (-1.0, -4.5), "DQ_DA": (2.0, -1.0),
           "VQ_AQ": (-1.0, -5.0), "VQ_CQ": (-1.0, -4.5), "VQ_DA": (-1.0, -4.0)}
    first_cell = {"CQ": "DQ_CQ", "AQ": "VQ_AQ", "DA": "VQ_DA"}
    for seed in range(5):
        sampler = StubSampler(full_completion(game.format_payoff(raw)), "85</response>")
        r = steering.steer("stub-model", tokenizer, MESSAGES, steering.parse_pricing("upstream-llm:-3"),
                           SamplingParams(max_new_tokens=20, temperature=0), generate_fn=sampler, rule="product",
                           rng=random.Random(seed))
        # the repriced choice is the rng's first draw; the raw matrix's largest product is VQ_AQ's 5
        assert r.action_priced == first_cell[random.Random(seed).choice(["CQ", "AQ", "DA"])]
        assert r.action_raw == "VQ_AQ" and r.frontier_priced == ["DQ_AQ", "DQ_DA"]
        assert r.action_priced not in r.frontier_priced   # upstream's rule can leave the frontier
        assert f"Chosen: {r.action_priced}, the largest LLM x user.</analyze><response>" in tokenizer.decode(
            sampler.calls[1][0])


def test_unparseable_payoff_gives_message_and_raw_text(tokenizer):
    broken = THINKING + "<payoff>{'DQ_AQ': maybe}</payoff><analyze>x</analyze><response>y</response>"
    sampler = StubSampler(broken)
    r = steering.steer("stub-model", tokenizer, MESSAGES, steering.parse_pricing("upstream-user:1"),
                       SamplingParams(max_new_tokens=20), generate_fn=sampler)
    assert len(sampler.calls) == 1  # no second stage
    assert r.error.startswith("the model's payoff does not parse: payoff is neither JSON nor a Python literal")
    assert r.text == r.stage_one == THINKING + "<payoff>{'DQ_AQ': maybe}</payoff>"
    assert r.payoff_raw is None and r.action_priced is None and r.response is None
    assert json.loads(json.dumps(r.to_json()))["error"] == r.error
    assert steering.format_side_by_side(r).splitlines()[2].split() == ["DQ_AQ", "-", "-", "-", "-"]


def test_no_payoff_block_at_all(tokenizer):
    sampler = StubSampler("I will just answer: 85.")
    r = steering.steer("stub-model", tokenizer, MESSAGES, steering.NoPrice(), SamplingParams(max_new_tokens=20),
                       generate_fn=sampler)
    assert "ended stage one (eos) without writing </payoff>" in r.error and r.text == "I will just answer: 85."


# -----------------------------------------------------------------------------
# sample.py --price (in process; a tiny random model saved with our own loader)

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    import torch

    from nano_gtalign.loader import save_pretrained
    from nano_gtalign.model import Transformer
    from nano_gtalign.model_config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                      eos_token_id=2, pad_token_id=0)
    path = tmp_path_factory.mktemp("price_model") / "m"
    save_pretrained(Transformer(cfg), tokenizer, path)
    return path


def test_sample_price_with_stubbed_model(model_dir, monkeypatch, capsys):
    import sample

    sampler = StubSampler(full_completion(game.format_payoff(M)), "Sure: 85. Want the steps?</response>")
    monkeypatch.setattr(sample, "generate", lambda model, *a, **k: sampler("stub-model", *a, **k))
    sample.main(["--model", str(model_dir), "--prompt", "What is 37 + 48?", "--price", "upstream-llm:1.5",
                 "--temperature", "0", "--max-new-tokens", "30"])
    out = capsys.readouterr().out
    from data.demo.task import DEMO_SYSTEM_PROMPT
    assert sampler.calls[0][0] == sample.load_tokenizer(model_dir).encode_chat(
        [{"role": "system", "content": DEMO_SYSTEM_PROMPT}, {"role": "user", "content": "What is 37 + 48?"}])
    assert "policy: upstream-llm:1.5 (LLM +1.5 on every cell; user +0 DA, +0.5 CQ, +1 AQ)" in out
    assert "\nDQ_AQ        2       3 *       3.5       4 *<\n" in out
    assert "\nDQ_DA        3     2.5 *<      4.5     2.5 *\n" in out
    assert "frontier before: DQ_AQ, DQ_DA   chosen: DQ_DA" in out
    assert "frontier after:  DQ_AQ, DQ_DA   chosen: DQ_AQ" in out
    assert "\nresponse (stop):\nSure: 85. Want the steps?\n" in out

    sampler.calls.clear()
    sample.main(["--model", str(model_dir), "--prompt", "What is 37 + 48?", "--price", "token:per_1k=5,DA=600,CQ=40,AQ=700",
                 "--json"])
    obj = json.loads(capsys.readouterr().out)
    assert (obj["action_raw"], obj["action_priced"]) == ("DQ_DA", "DQ_CQ")
    assert obj["payoff_priced"]["DQ_CQ"] == {"LLM": 1.0, "user": 1.3} and obj["response"] == "Sure: 85. Want the steps?"
    assert obj["text"].endswith("Chosen: DQ_CQ, the largest LLM x user.</analyze><response>Sure: 85. Want the steps?</response>")


def test_sample_price_rule_product(model_dir, monkeypatch, capsys):
    import sample

    # all LLM payoffs -2 after the price: DQ_CQ and VQ_CQ tie at the largest product, (-2)(-3) = 6, one
    # strategy (CQ), so the seed cannot change the choice; the sign-safe rule picks DQ_AQ
    raw = {"DQ_AQ": (0.0, 1.0), "DQ_CQ": (0.0, -3.5), "DQ_DA": (0.0, 0.5),
           "VQ_AQ": (0.0, -1.0), "VQ_CQ": (0.0, -3.5), "VQ_DA": (0.0, -2.0)}
    for rule, chosen in (("product", "DQ_CQ"), ("cobb_douglas", "DQ_AQ")):
        sampler = StubSampler(full_completion(game.format_payoff(raw)), "Which number?</response>")
        monkeypatch.setattr(sample, "generate", lambda model, *a, **k: sampler("stub-model", *a, **k))
        sample.main(["--model", str(model_dir), "--prompt", "Add 5 to my number.", "--price", "upstream-llm:-2",
                     "--rule", rule, "--seed", "0", "--json"])
        obj = json.loads(capsys.readouterr().out)
        assert obj["action_priced"] == chosen, rule
        assert obj["payoff_priced"]["DQ_CQ"] == {"LLM": -2.0, "user": -3.0}
    with pytest.raises(SystemExit):
        sample.main(["--model", str(model_dir), "--prompt", "Hi", "--price", "none", "--rule", "nash"])


def test_sample_price_with_random_model_reports_raw_text(model_dir, capsys):
    import sample

    sample.main(["--model", str(model_dir), "--prompt", "What is 37 + 48?", "--price", "upstream-user:1",
                 "--temperature", "0", "--max-new-tokens", "8"])
    out = capsys.readouterr().out  # returned normally: exit status 0
    assert "steering stopped: the model ended stage one (length) without writing </payoff>" in out
    assert "\nraw text:\n" in out
    sample.main(["--model", str(model_dir), "--prompt", "Hi", "--price", "none", "--max-new-tokens", "4", "--json",
                 "--seed", "0"])
    obj = json.loads(capsys.readouterr().out)
    assert obj["error"].startswith("the model ended stage one") and obj["payoff_raw"] is None and obj["text"]


def test_sample_price_bad_usage(model_dir):
    import sample

    with pytest.raises(SystemExit, match="sample.py: --price 'token:per_1k=2,payer=bank': payer must be"):
        sample.main(["--model", str(model_dir), "--prompt", "Hi", "--price", "token:per_1k=2,payer=bank"])
    with pytest.raises(SystemExit, match="--price needs the chat template"):
        sample.main(["--model", str(model_dir), "--prompt", "Hi", "--price", "none", "--raw"])

"""Tokenizer: ids and chat templates identical to transformers' tokenizer on the same files; a broken tokenizer
file or a chat template that fails (to compile, or in the sandbox while rendering) is one line naming its file.

Run: python -m pytest tests/test_tokenizer.py -q

The transformers side is loaded from a directory holding only the tokenizer files: next to a config.json
with model_type qwen2, transformers 5 substitutes its own Qwen2 pre-tokenizer for the one in tokenizer.json,
which would compare a different tokenizer.
"""
import json
from datetime import datetime

import pytest
import tokenizers

from nano_gtalign.loader import CheckpointError, load_tokenizer
from nano_gtalign.tokenizer import CHATML_TEMPLATE, Tokenizer
from tests.tiny import make_tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 37 + 48?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 37 + 48?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Add 37 to my number."},
     {"role": "assistant", "content": "Could you tell me your number?"}, {"role": "user", "content": "It is 48."}],
    [{"role": "user", "content": "héllo wörld 🙂\n\n  spaces  and <|im_end|> inside"},
     {"role": "assistant", "content": "<thinking>ok</thinking>"}],
]
TEXTS = ["What is 37 + 48? The answer is 85.", "  leading spaces\n\ttab", "ünïcödé 🙂 漢字",
         "<|im_start|>user\nhi<|im_end|>\n", ""]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok_dir, hf_tok, conv, gen):
    ours = Tokenizer.from_pretrained(tok_dir)
    msgs = CONVERSATIONS[conv]
    want = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == want
    assert ours.encode_chat(msgs, add_generation_prompt=gen) == hf_tok.encode(want, add_special_tokens=False)


def test_qwen_template_by_hand(tok_dir):
    ours = Tokenizer.from_pretrained(tok_dir)
    text = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # the specials are single tokens, not spelled out byte by byte
    assert ours.encode_chat([{"role": "user", "content": "Hi"}])[0] == 1


def test_chatml_fallback(tmp_path, hf_tok):
    ours = Tokenizer.from_pretrained(make_tokenizer(tmp_path, chat_template=None))
    assert ours.chat_template == CHATML_TEMPLATE
    msgs = CONVERSATIONS[2]
    text = ours.apply_chat_template(msgs[:2])
    assert text == ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nAdd 37 to my number.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    for gen in (True, False):
        want = hf_tok.apply_chat_template(msgs, chat_template=CHATML_TEMPLATE, tokenize=False,
                                          add_generation_prompt=gen)
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == want


def test_template_environment_matches_transformers(tok_dir, hf_tok):
    # Exercises what Hub templates rely on: trim/lstrip blocks, loop controls, tojson without HTML escaping,
    # special-token variables, tools=None, raise_exception.
    template = (
        "{% for m in messages %}\n"
        "  {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "{{ m['role'] }}: {{ m['content'] | tojson }}{{ eos_token }}\n"
        "{% endfor %}\n"
        "{% if tools is none %}no tools {% endif %}{{ pad_token }}|{{ bos_token is defined }}\n"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    ours = Tokenizer.from_pretrained(tok_dir)
    ours = Tokenizer(ours.tok, ours.config, ours.eos_token_ids, ours.pad_token_id, template)
    msgs = [{"role": "user", "content": "a <b> & \"c\" é"}, {"role": "assistant", "content": "x"},
            {"role": "user", "content": "dropped by break"}]
    want = hf_tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
    got = ours.apply_chat_template(msgs)
    assert got == want
    assert '"a <b> & \\"c\\" é"<|im_end|>' in got and "dropped" not in got

    bad = Tokenizer(ours.tok, ours.config, [2], 0, "{{ raise_exception('only user and assistant roles') }}")
    with pytest.raises(CheckpointError, match="chat template failed to render: only user and assistant roles"):
        bad.apply_chat_template(msgs)  # transformers raises jinja2's TemplateError; ours is one line for the scripts
    dated = Tokenizer(ours.tok, ours.config, [2], 0, "{{ strftime_now('%Y') }}")
    assert dated.apply_chat_template(msgs) == str(datetime.now().year)


def test_chat_template_jinja_file_takes_precedence(tmp_path):
    path = make_tokenizer(tmp_path)
    (path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_pretrained(path).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok_dir, hf_tok, text):
    ours = Tokenizer.from_pretrained(tok_dir)
    ids = ours.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_from_configs(tmp_path):
    path = make_tokenizer(tmp_path)
    ours = Tokenizer.from_pretrained(path)
    assert (ours.eos_token_ids, ours.pad_token_id, ours.vocab_size) == ([2], 0, 300)
    # AddedToken dict form, several EOS ids from generation_config.json, pad falling back to the first EOS
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "<|im_end|>", "special": True, "__type": "AddedToken"}
    cfg["pad_token"] = None
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = Tokenizer.from_pretrained(path)
    assert (ours.eos_token_ids, ours.pad_token_id) == ([2, 0], 2)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert Tokenizer.from_pretrained(path).eos_token_ids == [2, 1]


def test_bad_special_tokens_are_clear_errors(tmp_path):
    path = make_tokenizer(tmp_path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|eot|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: special token '<\|eot\|>' is not in"):
        Tokenizer.from_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": None}))
    with pytest.raises(ValueError, match="no EOS token"):
        Tokenizer.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_from_tokenizers_and_save_round_trip(tok_dir, tmp_path):
    raw = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ours = Tokenizer.from_tokenizers(raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=None)
    assert (ours.eos_token_ids, ours.pad_token_id, ours.chat_template) == ([2], 0, CHATML_TEMPLATE)
    assert Tokenizer.from_tokenizers(raw, eos_token="<|im_end|>").pad_token_id == 2
    ours.save_pretrained(tmp_path)
    back = Tokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    msgs = CONVERSATIONS[1]
    assert back.apply_chat_template(msgs) == ours.apply_chat_template(msgs) == \
        hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (back.eos_token_ids, back.pad_token_id) == ([2], 0)
    assert hf.eos_token_id == 2 and hf.pad_token_id == 0
    for text in TEXTS:
        assert back.encode(text) == ours.encode(text) == hf.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- broken files and templates: one line naming the file

def tokenizer_dir(tmp_path):
    return make_tokenizer(tmp_path / "tok")


def one_line_error(path, file):
    """load_tokenizer's CheckpointError (and Tokenizer.from_pretrained's ValueError) names `file`, on one line."""
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(path)
    msg = str(info.value)
    assert "\n" not in msg and str(file) in msg, msg
    with pytest.raises(ValueError) as info:
        Tokenizer.from_pretrained(path)
    assert "\n" not in str(info.value) and str(file) in str(info.value), str(info.value)
    return msg


@pytest.mark.parametrize("content", ["", "not json", "TRUNCATED", "[]", "{}", "null", b"\xff\xfe\x00garbage"])
def test_broken_tokenizer_json_is_one_line_naming_it(tmp_path, content):
    path = tokenizer_dir(tmp_path)
    file = path / "tokenizer.json"
    if content == "TRUNCATED":
        content = file.read_text()[:len(file.read_text()) // 2]
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line_error(path, file)


@pytest.mark.parametrize("name, content", [
    ("tokenizer_config.json", "{oops"), ("tokenizer_config.json", "[]"), ("tokenizer_config.json", b"\xff\xfe"),
    ("tokenizer_config.json", '{"eos_token": "<|im_end|>", "chat_template": 5}'),
    ("tokenizer_config.json", '{"eos_token": "<|im_end|>", "chat_template": [{"name": "default"}]}'),
    ("tokenizer_config.json", '{"eos_token": "<|im_end|>", "chat_template": ["{{ x }}"]}'),
    ("tokenizer_config.json", '{"eos_token": 5}'),
    ("generation_config.json", "{"), ("generation_config.json", "[2]"),
    ("generation_config.json", '{"eos_token_id": "2"}'), ("generation_config.json", '{"eos_token_id": [2, null]}'),
    ("chat_template.jinja", b"\xff\xfe{{ x }}"),
])
def test_broken_tokenizer_side_files_are_one_line_naming_them(tmp_path, name, content):
    path = tokenizer_dir(tmp_path)
    (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line_error(path, path / name)


# Each is refused by jinja2's sandbox (a SecurityError); none may run, and none may end in a traceback. (The
# sandbox renders an unsafe attribute on its own, `{{ f.__globals__ }}`, as nothing; using it raises.)
SANDBOX_ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].system('id') }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "{{ (messages[0]).update({'role': 'x'}) }}",
    "{{ strftime_now.__code__.co_code }}",
]


@pytest.mark.parametrize("template", SANDBOX_ESCAPES + [
    "{{ raise_exception('only user and assistant roles are supported') }}",  # the template refuses the messages
    "{{ undefined_thing.attribute }}",        # UndefinedError
    "{{ messages + 1 }}",                     # TypeError inside the template
    "{% for i in range(10**9) %}{% endfor %}",  # the sandbox's range limit
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",  # unbounded recursion
])
@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_template_that_fails_to_render_is_one_line_naming_its_file(tmp_path, template, where):
    path = tokenizer_dir(tmp_path)
    if where == "chat_template.jinja":
        (path / where).write_text(template)
    else:
        cfg = json.loads((path / where).read_text())
        (path / where).write_text(json.dumps({**cfg, "chat_template": template}))
    tok = load_tokenizer(path)  # the template compiles; it fails on rendering
    with pytest.raises(CheckpointError) as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path / where}: chat template failed to render"), msg
    with pytest.raises(CheckpointError):
        tok.encode_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template", ["{% for %}", "{{ messages[0] ", "{% if x %}no endif", "{% bogus %}"])
def test_template_that_does_not_compile_is_one_line_at_load(tmp_path, template):
    path = tokenizer_dir(tmp_path)
    (path / "chat_template.jinja").write_text(template)
    msg = one_line_error(path, path / "chat_template.jinja")
    assert "chat template does not compile" in msg, msg

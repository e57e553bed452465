"""Nothing silently wrong (docs/bad_input.md): each kind of fault that used to finish with exit 0 and plausible numbers
either gives the right result or stops with one message, a non-zero exit and nothing written. The inputs
are the shared cases (../shared/cases/, copied here so the tests stand alone) or smaller ones of the kind."""
import json
import logging
import unicodedata

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from data.collate import Collator
from data.convert import convert_fever, fever_claims
from data.facts import fact_group, read_facts
from data.records import DataError, load_records
from editor.base import NonFiniteEdit
from data.subjects import subject_end
from editor.locate import encode
from editor.memit import IllPosedSolve, condition_number
from model.lm import MetricError, accuracy, logits, success
from model.tiny import byte_tokenizer
from model.toy import word_tokenizer
from pipeline.checkpoint import load_editor_checkpoint
from pipeline.experiment import run, run_edit
from tests.helpers import (FT, MAYOR_FACTS, ROOT, SHARED, build_model, cli, edit_cfg, make_cfg, one_group, qa_records,
                           smoke_cfg, varied_records, write_facts, write_records)

# ../shared/cases/fp16-nonfinite/facts.jsonl (first two facts) and ../shared/cases/trailing-space/
FREEDONIA = [{"prompt": "The capital of Freedonia is", "answer": "Fredville",
              "rephrases": ["Freedonia's capital city is"], "subject": "Freedonia"},
             {"prompt": "The official language of Sylvania is", "answer": "Sylvanian",
              "rephrases": ["People in Sylvania speak"], "subject": "Sylvania"}]
# ../shared/cases/subject-multibyte/record.json: "ý" is two byte-level tokens in GPT-2's tokenizer
HORVATNY = {"subject": "Marek Horvátný", "src": "Which club does Marek Horvátný play for? He plays for",
            "rephrase": "The team of Marek Horvátný is", "answers": ["Riverton United"], "alt": "Riverton United",
            "loc": "nq question: who wrote the novel the silent harbour", "loc_ans": "Elsa Brandt"}


def facts_file(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def last_error(err: str) -> str:
    return err.strip().splitlines()[-1]


def gpt2_tokenizer():
    if not (SHARED / "gpt2-tokenizer").is_dir():
        pytest.skip("../shared/data/gpt2-tokenizer is not present")
    tok = AutoTokenizer.from_pretrained(str(SHARED / "gpt2-tokenizer"))
    tok.pad_token = tok.eos_token
    return tok


def tokenizers() -> dict:
    """The byte-level tokenizer of the tiny models, GPT-2's, and SmolLM2's where the project has it cached."""
    byte = byte_tokenizer("gpt2", 512)
    byte.pad_token = byte.eos_token
    out = {"byte-level": byte, "gpt2": gpt2_tokenizer()}
    smollm2 = sorted((ROOT / "cache").glob("SmolLM2-135M-Instruct*/tokenizer.json"))
    if smollm2:  # model=smollm2 converted once into the project's cache (tests/test_llama.py)
        out["smollm2"] = AutoTokenizer.from_pretrained(str(smollm2[0].parent))
    return out


# ----- 1. non-finite edited weights are never applied, reported or saved ------------------------------------
def test_fp16_overflow_in_mode_edit_stops_and_saves_nothing(tmp_path):
    """The shared case: FT with lr 5 on a float16 model overflows; it used to save NaN weights and print ES 0."""
    facts = facts_file(tmp_path / "facts.jsonl", FREEDONIA)
    code, err = cli(tmp_path, "mode=edit", "model=tiny-gpt2", "model.dtype=float16", "data=zsre", "editor=ft",
                    "editor.lr=5", f"edit.facts={facts}")
    assert code == 2 and "Traceback" not in err
    assert last_error(err).startswith("error: editor ft: the edited parameter transformer.h.3.mlp.c_fc.weight has ")
    assert "not finite in the model's dtype torch.float16" in err and "not applied, reported or saved" in err
    assert not (tmp_path / "run" / "edited").exists()


NON_FINITE = {"ft": ["editor.lr=5"], "locft_bf": ["editor.lr=1e4", "editor.loss_threshold=0"],
              "malmen": ["editor.lr_init=1e6"], "mend": ["editor.lr_init=1e6"],
              "memit": ["editor.clamp_factor=1e9", "editor.norm_coef=0", "editor.kl_coef=0", "editor.lr=1e5"]}
NON_FINITE["emmet"] = NON_FINITE["memit"]


@pytest.mark.parametrize("editor", NON_FINITE)
def test_every_editor_refuses_non_finite_weights(tmp_path, editor):
    """Training (MALMEN, MEND: the meta-step's edited LM) and validation (the others) on a float16 model."""
    with pytest.raises(NonFiniteEdit, match=f"^editor {editor}: the edited parameter transformer\\.h\\.\\d\\.mlp\\."
                                            "c_\\w+\\.weight has .* not finite in the model's dtype torch.float16"):
        run(smoke_cfg(tmp_path, "tiny-gpt2", "zsre", editor, "model.dtype=float16", *NON_FINITE[editor]), tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_a_metric_that_cannot_be_computed_is_never_zero(tmp_path):
    cfg = make_cfg("model=tiny-gpt2", "data.n_edits=4", "data.batch_size=4")
    model, tok = build_model(cfg)
    batch = one_group(cfg, tok, qa_records(4)).edit[0]
    lg = logits(model, batch, "causal")  # (N, V) at the answer positions, row-major
    first_of_example_1 = int((batch["labels"][0] != -100).sum())
    lg[first_of_example_1, 0] = float("nan")  # one answer logit of example 1
    assert accuracy(lg, batch, "causal")[1].isnan() and not accuracy(lg, batch, "causal")[[0, 2, 3]].isnan().any()
    model.lm_head.weight.data[0] = float("inf")  # tied to the embeddings: every logit becomes inf or NaN
    with pytest.raises(MetricError, match="outputs are not finite .* on 4 of 4 tuples, so ES/GS/LS cannot be computed"):
        success(model, [batch], "causal", "cpu")


# ----- 2. ill-posed closed-form solves are refused -------------------------------------------------------------
def test_memit_statistics_from_fewer_tokens_than_the_layer_width(tmp_path):
    """The shared case memit-few-stats-tokens: editor.n_samples=1 leaves C of rank < d_in = 128."""
    train = write_records(tmp_path / "train.json", varied_records(16), "zsre")
    facts = facts_file(tmp_path / "facts.jsonl", FREEDONIA)
    code, err = cli(tmp_path, "mode=edit", "model=tiny-gpt2", "data=zsre", "editor=memit", f"data.train_path={train}",
                    "editor.n_samples=1", f"edit.facts={facts}", f"cache_dir={tmp_path / 'cache'}")
    assert code == 2 and "Traceback" not in err
    msg = last_error(err)
    assert msg.startswith("error: editor memit: the key statistics C of module transformer.h.1.mlp.c_proj come from ")
    assert f"tokens of editor.stats_source='train' ({train}), 1 of 32 texts (editor.n_samples=1), fewer than the " \
           "module's input width d_in = 128" in msg
    assert "a larger editor.n_samples (the source has 32 texts)" in msg
    assert not (tmp_path / "run" / "edited").exists()


@pytest.mark.parametrize("editor", ["memit", "emmet"])
def test_ill_conditioned_statistics_are_refused(tmp_path, editor):
    """Enough tokens (456 >= 128) but repetitive text: qa_records share their prefixes, so their keys repeat and C
    is singular. MEMIT used to solve anyway and return an update many times the weight's norm."""
    cfg = smoke_cfg(tmp_path, "tiny-gpt2", "zsre", editor, f"data.train_path={tmp_path / 'train.json'}")
    write_records(tmp_path / "train.json", qa_records(8), "zsre")  # smoke_cfg wrote varied text there
    what = "lambda C \\+ K K\\^T" if editor == "memit" else "the scaled key statistics lambda C"
    fix = "" if editor == "memit" else "for lambda C, "  # EMMET's message names each system's own fix
    with pytest.raises(IllPosedSolve, match=f"^editor {editor}: the closed-form solve of module transformer.h.1.mlp."
                                            f"c_proj is ill-conditioned: {what} has condition number .*beyond 1/eps = "
                                            "4.5e\\+15 of its torch.float64 solve.*C come from 456 tokens of "
                                            f"editor.stats_source='train'.* Fix: {fix}more statistics text.* or a "
                                            "larger editor.lam \\(now "):
        run(cfg, tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_condition_number_estimate():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64))
    for kappa in (10.0, 1e4, 1e9):
        a = (q * torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), 200, dtype=torch.float64)) @ q.T
        assert kappa / 1.2 <= condition_number(a) <= kappa * 1.0001
    keys = torch.randn(128, 50, generator=gen)
    assert condition_number(keys @ keys.T) == float("inf")  # rank 50 of 128


# ----- 3. one space between prompt and answer ----------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_trailing_space_facts_give_the_same_batches(tmp_path, fmt):
    padded = [{"prompt": f["prompt"] + " ", "answer": "  " + f["answer"] + " ",
               "rephrases": [r + " \t" for r in f["rephrases"]], "subject": f["subject"]} for f in FREEDONIA]
    for name, tok in tokenizers().items():
        clean = fact_group(read_facts(write_facts(tmp_path / f"a.{fmt}", FREEDONIA, fmt)), 4, Collator(tok, "causal"),
                           "a")
        spaced = fact_group(read_facts(write_facts(tmp_path / f"b.{fmt}", padded, fmt)), 4, Collator(tok, "causal"),
                            "b")
        for kind in ("edit", "equiv"):
            for x, y in zip(getattr(clean, kind), getattr(spaced, kind)):
                assert all(torch.equal(x[k], y[k]) for k in x), (name, kind)


def test_zsre_and_fever_files_and_conversions_lose_surrounding_whitespace(tmp_path):
    record = dict(HORVATNY, src=HORVATNY["src"] + " ", rephrase=HORVATNY["rephrase"] + "  ",
                  answers=[" Riverton United "], loc=HORVATNY["loc"] + " ", loc_ans=" Elsa Brandt")
    (tmp_path / "z.json").write_text(json.dumps([record]))
    (tmp_path / "clean.json").write_text(json.dumps([HORVATNY]))
    assert load_records(str(tmp_path / "z.json"), "zsre") == load_records(str(tmp_path / "clean.json"), "zsre")
    fever = {"prompt": "Paris is in France. ", "equiv_prompt": [" France holds Paris. "], "alt": "SUPPORTS",
             "unrel_prompt": "Rome is in Peru.\n", "unrel_ans": "REFUTES"}
    (tmp_path / "f.json").write_text(json.dumps([fever]))
    [r] = load_records(str(tmp_path / "f.json"), "fever")
    assert (r.prompt, r.equiv_prompts, r.unrel_prompt) == ("Paris is in France.", ("France holds Paris.",),
                                                           "Rome is in Peru.")
    claims, _ = fever_claims([{"id": 1, "claim": "Paris is in France. ", "label": "SUPPORTS",
                               "filtered_rephrases": [" France holds Paris."]},
                              {"id": 2, "claim": " Rome is in Peru.", "label": "REFUTES"}], "kilt.jsonl")
    rows, _ = convert_fever(claims, "kilt.jsonl", missing_equiv="standin")
    assert [(x["prompt"], x["equiv_prompt"]) for x in rows] == [("Paris is in France.", ["France holds Paris."]),
                                                              ("Rome is in Peru.", ["Rome is in Peru."])]


def test_trailing_space_edits_score_as_without_it(tmp_path):
    """The shared case trailing-space: ES was scored on "is␣␣Fredville"; now both files give the same run."""
    records = []
    for name, rows in (("nospace", FREEDONIA), ("space", [dict(f, prompt=f["prompt"] + " ") for f in FREEDONIA])):
        facts = facts_file(tmp_path / f"{name}.jsonl", rows)
        cfg = edit_cfg(tmp_path, "tiny-gpt2", facts, *FT, f"edit.out_dir={tmp_path / name}")
        records.append(run_edit(cfg, tmp_path))
    assert records[0]["before"] == records[1]["before"] and records[0]["after"] == records[1]["after"]


def test_whitespace_only_field_is_refused_by_name(tmp_path):
    facts = facts_file(tmp_path / "facts.jsonl", [FREEDONIA[0], dict(FREEDONIA[1], answer=" \t ")])
    code, err = cli(tmp_path, "mode=edit", "model=tiny-gpt2", "data=zsre", *FT, f"edit.facts={facts}")
    assert code == 2 and last_error(err) == f"error: {facts}: record 1: field 'answer': only whitespace (' \\t ')"
    assert not (tmp_path / "run" / "edited").exists()


# ----- 4. the last subject token covers the subject's last character ------------------------------------------
@pytest.mark.parametrize("form", ["NFC", "NFD"])
@pytest.mark.parametrize("subject_form", ["NFC", "NFD"])
def test_subject_position_is_the_last_token_of_its_last_character(form, subject_form):
    prompts = [HORVATNY["src"], "Das Café is in", "Der Fluss Ölbæk", "東京 is the capital of"]
    subjects = [HORVATNY["subject"], "Café", "Ölbæk", "東京"]
    for name, tok in tokenizers().items():
        for prompt, subject in zip(prompts, subjects):
            prompt, subject = unicodedata.normalize(form, prompt), unicodedata.normalize(subject_form, subject)
            end = subject_end(prompt, subject)
            assert unicodedata.normalize("NFC", prompt[:end]).endswith(unicodedata.normalize("NFC", subject))
            for text, stop in ((prompt, end), (f"{subject} is a", len(subject))):  # keys/targets and the KL prompt
                batch, pos = encode(tok, [text], [stop])
                ids = batch["input_ids"][0].tolist()
                # tokens up to pos decode to the text through the subject's last character, and not one fewer
                assert tok.decode(ids[: int(pos) + 1]) == text[:stop], (name, text)
                assert tok.decode(ids[: int(pos)]) != text[:stop], (name, text)


def test_subject_end_keeps_combining_marks_with_their_letter():
    nfd = unicodedata.normalize("NFD", "Horvátný plays")
    assert nfd[:subject_end(nfd, "Horvátný")] == unicodedata.normalize("NFD", "Horvátný")
    assert subject_end(nfd, unicodedata.normalize("NFD", "Horva")) is not None  # a substring, not a whole word
    assert nfd[:subject_end(nfd, unicodedata.normalize("NFD", "Horva"))] == unicodedata.normalize("NFD", "Horvá")


# ----- 5. the toy model says which words it does not know ------------------------------------------------------
# ../shared/cases/toy-unknown-words/facts.json
UNKNOWN = [{"prompt": "The mother tongue of Lina Varga is", "answer": "Portuguese",
            "rephrases": ["Lina Varga grew up speaking"], "subject": "Lina Varga"},
           {"prompt": "Tomas Wehrli works in the field of", "answer": "mathematics",
            "rephrases": ["The discipline of Tomas Wehrli is"], "subject": "Tomas Wehrli"}]
WORLD = ["The mother tongue of Ada Lind is French", "Ada Lind works in the field of physics",
         "The discipline of Ada Lind is physics", "Ada Lind grew up speaking French"]


@pytest.fixture
def toy_dir(tmp_path):
    """A toy-gpt2-like model (word-level tokenizer over a small world's words), saved as ensure_toy_model saves it."""
    tok = word_tokenizer(WORLD, max_length=64)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=4, n_embd=16, n_head=2)).save_pretrained(
        tmp_path / "toy")
    tok.save_pretrained(tmp_path / "toy")
    return tmp_path / "toy"


def test_unknown_words_are_named_by_field(tmp_path, toy_dir):
    tok = AutoTokenizer.from_pretrained(str(toy_dir))
    collator = Collator(tok, "causal")
    with pytest.raises(DataError, match="record 0: field 'prompt': prompt has 2 word\\(s\\) outside the model's "
                                        "word-level vocabulary: 'Lina', 'Varga'") as err:
        fact_group(read_facts(write_facts(tmp_path / "f.json", UNKNOWN, "json")), 2, collator, "f.json")
    assert "only knows the synthetic world's vocabulary" in str(err.value) and "zero tokens" not in str(err.value)
    known_prompt = [{"prompt": "The mother tongue of Ada Lind is", "answer": "Portuguese"}]
    with pytest.raises(DataError, match="record 0: field 'answer': answer has 1 word\\(s\\) .*: 'Portuguese'"):
        fact_group(read_facts(write_facts(tmp_path / "g.json", known_prompt, "json")), 2, collator, "g.json")
    rephrased = [{"prompt": "The mother tongue of Ada Lind is", "answer": "French", "rephrases": ["Ada speaks"]}]
    with pytest.raises(DataError, match="record 0: field 'rephrases\\[0\\]': prompt has 1 word\\(s\\) .*'speaks'"):
        fact_group(read_facts(write_facts(tmp_path / "h.json", rephrased, "json")), 2, collator, "h.json")
    with pytest.raises(ValueError, match="prompt tokenises only to special tokens \\['<unk>'\\]"):
        collator(["<unk>"], ["French"])


def test_toy_model_refuses_unknown_words_in_mode_edit(tmp_path, toy_dir):
    """The shared case toy-unknown-words, on model=toy-gpt2 with its model directory given (no pretraining)."""
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(UNKNOWN))
    code, err = cli(tmp_path, "mode=edit", "model=toy-gpt2", f"model.name_or_path={toy_dir}", "data=zsre", *FT,
                    f"edit.facts={facts}")
    assert code == 2 and "Traceback" not in err
    assert last_error(err).startswith(f"error: {facts}: record 0: field 'prompt': prompt has 2 word(s) outside the "
                                      "model's word-level vocabulary: 'Lina', 'Varga'")
    assert not (tmp_path / "run" / "edited").exists()


# ----- 6. CSV lists cannot collide with the text ------------------------------------------------------------------
def test_csv_pipe_split_is_said_and_escapable(tmp_path, caplog):
    """The shared case csv-pipe: a | meant as text used to become two rephrasings without a word."""
    cell = "Nordlicht Motors | company history. Nordlicht Motors started in"
    (tmp_path / "a.csv").write_text(f'prompt,answer,rephrases,subject\nNordlicht Motors was founded in,Tampere,'
                                    f'"{cell}",Nordlicht Motors\n')
    with caplog.at_level(logging.WARNING, logger="data.facts"):
        [fact] = read_facts(str(tmp_path / "a.csv"))
    assert fact.equiv_prompts == ("Nordlicht Motors", "company history. Nordlicht Motors started in")
    assert "the rephrases cell of 1 record(s) (0) was split on '|' into several rephrasings" in caplog.text
    assert "write \\| for a literal '|'" in caplog.text
    caplog.clear()
    (tmp_path / "b.csv").write_text(f'prompt,answer,rephrases\nNordlicht Motors was founded in,Tampere,'
                                    f'"{cell.replace("|", chr(92) + "|")}|Where was Nordlicht founded? In"\n')
    with caplog.at_level(logging.WARNING, logger="data.facts"):
        [fact] = read_facts(str(tmp_path / "b.csv"))
    assert fact.equiv_prompts == (cell, "Where was Nordlicht founded? In")


def test_csv_split_leaving_an_empty_piece_is_named(tmp_path):
    (tmp_path / "c.csv").write_text("prompt,answer,rephrases\nNordlicht Motors was founded in,Tampere,"
                                    "Nordlicht Motors | company history |\n")
    code, err = cli(tmp_path, "mode=edit", "model=tiny-gpt2", "data=zsre", *FT, f"edit.facts={tmp_path / 'c.csv'}")
    assert code == 2 and last_error(err) == (
        f"error: {tmp_path / 'c.csv'}: record 0: field 'rephrases[2]': empty after splitting the cell "
        "'Nordlicht Motors | company history |' on '|' into 3 rephrasings; write \\| for a literal '|'")
    assert not (tmp_path / "run" / "edited").exists()


# ----- 7. an edited model can be edited again with its base model's hyper-network ------------------------------
def test_edited_model_is_edited_again_with_the_base_models_checkpoint(tmp_path):
    train = write_records(tmp_path / "train.json", qa_records(8), "zsre")
    valid = write_records(tmp_path / "valid.json", qa_records(4, start=100), "zsre")
    for name, extra in (("base", []), ("other", ["model.tiny.n_head=4"])):  # same shapes, another model
        (tmp_path / name).mkdir()
        run(make_cfg("model=tiny-gpt2", "data=zsre", "editor=malmen", "editor.rank=32", f"data.train_path={train}",
                     f"data.valid_path={valid}", "data.n_edits=4", "max_train_steps=1", *extra), tmp_path / name)
    facts = facts_file(tmp_path / "facts.jsonl", MAYOR_FACTS)
    first = run_edit(edit_cfg(tmp_path, "tiny-gpt2", facts, *FT), tmp_path)
    base = {"arch": "gpt2", "name_or_path": None, "tiny": dict(make_cfg("model=tiny-gpt2").model.tiny)}
    assert first["base_model"] == base
    again = ["mode=edit", *first["reload"], "data=zsre", "editor=malmen", "editor.rank=32",
             f"edit.facts={facts}"]
    code, err = cli(tmp_path / "again", *again, f"editor.checkpoint={tmp_path / 'base' / 'checkpoint.pt'}")
    assert code == 0, err
    second = json.loads((tmp_path / "again" / "run" / "edited" / "provenance.json").read_text())
    assert second["base_model"] == base and "model.tiny=null" in second["reload"]
    code, err = cli(tmp_path / "refused", *again, f"editor.checkpoint={tmp_path / 'other' / 'checkpoint.pt'}")
    assert code == 2 and "Traceback" not in err
    assert (f"this run uses model tiny-gpt2 (an edited model, {tmp_path / 'edited'}, whose base model is "
            f"{dict(base['tiny'])})") in err
    assert "model.tiny: checkpoint {'n_layer': 4, 'n_embd': 32, 'n_head': 4" in err
    assert "this run {'n_layer': 4, 'n_embd': 32, 'n_head': 2" in err
    assert not (tmp_path / "refused" / "run" / "edited").exists()


# ----- 8. messages say what a file is ------------------------------------------------------------------------
def test_checkpoint_that_is_a_directory_or_json_or_text_is_named_so(tmp_path):
    facts = facts_file(tmp_path / "facts.jsonl", MAYOR_FACTS)
    (tmp_path / "ckpt").mkdir()
    code, err = cli(tmp_path, "mode=edit", "model=tiny-gpt2", "data=zsre", "editor=malmen", "editor.rank=32",
                    f"editor.checkpoint={tmp_path / 'ckpt'}", f"edit.facts={facts}")
    assert code == 2 and last_error(err) == f"error: editor checkpoint {tmp_path / 'ckpt'} is a directory, not a " \
                                            "checkpoint file"
    assert not (tmp_path / "run" / "edited").exists()
    (tmp_path / "results.json").write_text(json.dumps({"final": {"ES": 0.5}}))
    (tmp_path / "notes.txt").write_text("the checkpoint is in outputs/\n")
    # loading (editor.checkpoint=, editor.resume=true) refuses them by name before it reads them or the editor
    with pytest.raises(ValueError, match="results.json is a JSON file, not a torch checkpoint"):
        load_editor_checkpoint(tmp_path / "results.json", editor=None, config={})
    with pytest.raises(ValueError, match="notes.txt is a text file, not a torch checkpoint .* begins 'the checkpoint"):
        load_editor_checkpoint(tmp_path / "notes.txt", editor=None, config={})

"""One registry of editors (pipeline/registry.py, read from config/editor/*.yaml): each file's class is the editor
it names, its facts agree with that class, and each of its keys is an argument of the class, a fact or a run option,
so that build_editor passes every setting (a misspelt key would be left out)."""
import pytest
from hydra.utils import get_class

from pipeline.experiment import init_parameters
from pipeline.registry import DISPLAY_NAMES, EDITORS, FACTS, LOCATED, META_TRAINED, REGISTRY, RUN_OPTIONS
from tests.helpers import make_cfg


@pytest.mark.parametrize("name", EDITORS)
def test_each_editor_file_names_its_class_and_every_key_is_an_argument_a_fact_or_a_run_option(name):
    cfg = make_cfg("model=smollm2", f"editor={name}")  # smollm2 has every located editor's model keys
    cls = get_class(cfg.editor._target_)
    assert cfg.editor.name == REGISTRY[name].name == cls.name == name
    assert cls.trainable == (name in META_TRAINED) and DISPLAY_NAMES[name]
    assert set(cfg.editor) - init_parameters(cls) - set(FACTS) - set(RUN_OPTIONS) == set()
    assert (name in LOCATED) == ("located" in cfg.editor)


def test_the_registry_holds_the_papers_editors_and_ours():
    assert set(EDITORS) == {"malmen", "mend", "ft", "memit", "emmet", "locft_bf"}
    assert set(META_TRAINED) == {"malmen", "mend"}
    assert LOCATED == {"memit": "memit", "emmet": "memit.emmet", "locft_bf": "locft_module"}
    assert DISPLAY_NAMES["locft_bf"] == "LocFT-BF"


def test_mend_with_the_normal_equation_is_refused_for_malmen():
    """editor=mend builds MEND, which sums the shifts: the normal equation is editor=malmen's (ablation=sum is the
    other way round: MALMEN's switch, built as MEND and named 'malmen (ablation=sum)')."""
    from pipeline.preflight import check_editor
    with pytest.raises(ValueError, match="editor=mend sums the shifts .* use editor=malmen"):
        check_editor(make_cfg("model=tiny-gpt2", "editor=mend", "editor.aggregation=normal_equation"))

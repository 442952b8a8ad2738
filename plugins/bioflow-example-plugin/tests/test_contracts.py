"""bioflow's contract checks on this package's components (listed by bioflow's pytest plugin)."""

from bioflow.testing import check_component


def test_contract(bioflow_component):
    check_component(*bioflow_component)


def test_all_components_are_covered(request):
    from bioflow.testing import registered

    names = {name for _, name in registered("bioflow-example-plugin")}
    assert names == {
        "bioflow-example-plugin:field_classifier",
        "bioflow-example-plugin:dilated_resnet",
        "bioflow-example-plugin:tversky",
        "bioflow-example-plugin:distance_split",
    }

"""The plugin contract: hooks typed and documented, registration checks derived from the Protocols,
the public import surface documented and versioned, and the README's hook reference generated."""

import ast
import inspect
import pathlib
import re
import typing

import pytest

import ftengine
import ftengine.plugin
from ftengine.core import hookspecs
from ftengine.core import plugins
from ftengine.core import types

ROOT = pathlib.Path(ftengine.__file__).parent.parent


@pytest.mark.parametrize("kind", sorted(plugins.KINDS))
def test_hook_is_typed_with_its_protocol_and_documented(kind):
    hook_name, protocol = plugins.KINDS[kind]
    hook = getattr(hookspecs, hook_name)
    register = typing.get_type_hints(hook)["register"]
    assert typing.get_args(register) == (protocol,)
    doc = inspect.getdoc(hook)
    assert "Example::" in doc and ".. versionadded::" in doc
    assert hook in hookspecs.HOOKS


def test_protocol_members_split_required_and_optional():
    required, optional = types.protocol_members(types.ModelAdapter)
    assert required == ("name", "model_types", "default_target_modules", "default_chat_template", "patch")
    assert optional == ("gguf", "routes", "unpatch", "quantized_load")
    assert types.protocol_members(types.GGUFSupport) == (
        ("architecture", "tensor_name", "tensor", "metadata", "extra_tensors"), ("split_tensor", "mmproj"))


class Adapter:
    name, model_types, default_target_modules, default_chat_template = "x", ("x",), (), None

    def patch(self, model, get_op):
        return []


class HalfLayout:
    architecture = "llama"

    def tensor_name(self, hf_name):
        return hf_name


def test_check_protocol_names_missing_required_and_incomplete_optional_members():
    assert types.check_protocol(Adapter(), types.ModelAdapter) == []
    with_layout = Adapter()
    with_layout.gguf = HalfLayout()
    assert types.check_protocol(with_layout, types.ModelAdapter) == ["gguf.tensor", "gguf.metadata",
                                                                      "gguf.extra_tensors"]
    without_patch = type("NoPatch", (), {"name": "y", "model_types": ()})()
    assert types.check_protocol(without_patch, types.ModelAdapter) == [
        "default_target_modules", "default_chat_template", "patch"]


class IncompleteAdapterPlugin:
    @ftengine.plugin.hookimpl
    def register_models(self, register):
        adapter = Adapter()
        adapter.gguf = HalfLayout()
        register(adapter)


def test_registration_reports_an_incomplete_capability():
    regs = plugins.registries()
    try:
        info = regs.add_plugin(IncompleteAdapterPlugin(), name="incomplete-adapter")
        assert "without gguf.tensor, gguf.metadata, gguf.extra_tensors" in info.error
        assert "x" not in plugins.get_registry("models")
    finally:
        regs.remove_plugin("incomplete-adapter")


def test_first_party_objects_satisfy_their_protocols():
    for kind, (_, protocol) in plugins.KINDS.items():
        for name, obj in plugins.get_registry(kind).items():
            assert types.check_protocol(obj, protocol) == [], (kind, name)


def _attribute_docstring(module: str, name: str) -> str:
    """The string literal right after ``name = ...`` at the top level of ``module``."""
    tree = ast.parse(inspect.getsource(__import__(module, fromlist=["_"])))
    body = tree.body
    for node, following in zip(body, body[1:], strict=False):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and isinstance(following, ast.Expr):
            return following.value.value
    return ""


@pytest.mark.parametrize("name", ftengine.plugin.__all__)
def test_every_public_name_is_documented_and_versioned(name):
    obj = getattr(ftengine.plugin, name)
    doc = obj.__doc__ if inspect.isclass(obj) or inspect.isfunction(obj) or isinstance(obj, type) else None
    if name == "hookimpl" or doc is None or doc is type(obj).__doc__:
        defining = {"hookimpl": "ftengine.core.hookspecs", "OP_NAMES": "ftengine.core.kernels",
                    "Message": "ftengine.core.types", "GetOp": "ftengine.plugins.models._patching"}[name]
        doc = _attribute_docstring(defining, name)
    assert doc and ".. versionadded::" in doc, name


def test_public_surface_lists_every_protocol_and_hook_type():
    for _, protocol in plugins.KINDS.values():
        assert protocol.__name__ in ftengine.plugin.__all__


def test_example_plugin_imports_only_the_public_surface():
    package = ROOT / "examples" / "ftengine-example-plugin" / "ftengine_example_plugin"
    imported = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    ours = {m for m in imported if m.split(".")[0] == "ftengine"}
    assert ours == {"ftengine.plugin"}


def test_readme_hook_reference_is_generated_from_the_hookspecs():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- hooks:begin -->\n(.*?)\n<!-- hooks:end -->", readme, re.S)
    assert match, "README.md has no generated hook reference"
    assert match.group(1) == hookspecs.reference(), (
        "README's hook reference is stale: paste the output of "
        "`python -c 'from ftengine.core.hookspecs import reference; print(reference())'`")
    for hook in hookspecs.HOOKS:
        assert f"`{hook.__name__}(register: " in match.group(1)

from paser.selection.ccg import ConceptGraph, extract_concepts, lemmatize, normalize_concept


def f(*concepts):
    return frozenset(concepts)


def test_paper_rule_on_hand_made_concepts():
    graph = ConceptGraph()
    assert graph.conflict(f("python", "sort", "list")) is None
    graph.add(f("python", "sort", "list"))
    assert graph.conflict(f("python", "list", "recursion")) is None  # the known pair co-occurred
    graph.add(f("python", "list", "recursion"))
    assert graph.conflict(f("recursion", "sort")) == ("recursion", "sort")  # both known, never together
    assert graph.conflict(f("java", "sql")) is None  # unknown concepts never conflict
    assert graph.conflict(f("python")) is None
    graph.add(f("recursion", "sort"))
    assert graph.conflict(f("recursion", "sort", "python")) is None


def test_normalisation():
    assert lemmatize("functions") == "function"
    assert lemmatize("queries") == "query"
    assert lemmatize("boxes") == "box"
    assert lemmatize("class") == "class" and lemmatize("status") == "status"
    assert normalize_concept("Python Functions!") == "python function"


def test_extracted_concepts_are_normalised():
    concepts = extract_concepts("Write Python functions that sort lists of integers with quicksort.")
    assert 0 < len(concepts) <= 5
    assert all(c == normalize_concept(c) for c in concepts)
    assert "python function" in concepts

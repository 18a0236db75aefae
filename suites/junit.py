"""JUnit XML: one test case per check (failed when its pass criterion fails), flags as
system-out, so CI systems show robustness next to unit tests."""

from __future__ import annotations

import os
from typing import Any
from xml.etree import ElementTree as ET

from bastion.fileio import write_atomic


def junit_xml(report: dict[str, Any]) -> str:
    checks = report.get("checks", [])
    failures = sum(1 for c in checks if c.get("passed") is False)
    suite = ET.Element(
        "testsuite",
        name=f"bastion.{report['suite']['name']}",
        tests=str(len(checks)),
        failures=str(failures),
        errors="0",
        time=f"{report.get('timings', {}).get('total_seconds', 0.0):.3f}",
    )
    for check in checks:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"bastion.{check['attack']}",
            name=check["id"],
            time=f"{check.get('seconds', 0.0):.3f}",
        )
        lines = [
            f"eps={r['eps']:g} robust_accuracy={r['robust_accuracy']:.4f}" for r in check["results"]
        ]
        if check.get("passed") is False:
            fail = ET.SubElement(case, "failure", message=f"criterion failed: {check['criterion']}")
            fail.text = "\n".join(lines)
        ET.SubElement(case, "system-out").text = "\n".join(lines)
    flags = [f"[{f['name']}] {f['message']}" for f in report.get("flags", [])]
    ET.SubElement(suite, "system-out").text = "\n".join(
        [
            f"clean_accuracy={report['clean_accuracy']:.4f}",
            f"robust_accuracy={report['robust_accuracy']:.4f}",
            *flags,
        ]
    )
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    write_atomic(path, junit_xml(report))

"""JUnit XML: one test case per check (failed when its pass criterion fails), flags as
system-out, so CI systems show robustness next to unit tests."""

from __future__ import annotations

import os
from xml.etree import ElementTree as ET

from bastion.fileio import write_atomic
from bastion.suites.report_model import ReportData


def junit_xml(report: ReportData) -> str:
    checks = report.checks
    failures = sum(1 for c in checks if c.passed is False)
    suite = ET.Element(
        "testsuite",
        name=f"bastion.{report.suite_name}",
        tests=str(len(checks)),
        failures=str(failures),
        errors="0",
        time=f"{report.timings.total_seconds:.3f}",
    )
    for check in checks:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"bastion.{check.attack}",
            name=check.id,
            time=f"{check.seconds:.3f}",
        )
        lines = [f"eps={r.eps:g} robust_accuracy={r.robust_accuracy:.4f}" for r in check.results]
        if check.passed is False:
            fail = ET.SubElement(case, "failure", message=f"criterion failed: {check.criterion}")
            fail.text = "\n".join(lines)
        ET.SubElement(case, "system-out").text = "\n".join(lines)
    flags = [f"[{f.name}] {f.message}" for f in report.flags]
    ET.SubElement(suite, "system-out").text = "\n".join(
        [
            f"clean_accuracy={report.clean_accuracy:.4f}",
            f"robust_accuracy={report.robust_accuracy:.4f}",
            *flags,
        ]
    )
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(report: ReportData, path: str | os.PathLike[str]) -> None:
    write_atomic(path, junit_xml(report))

"""The Quickstart's demo runs, and every solve it reports converged."""

from experiments import solver_demo


def test_solver_demo_reports_converged_solves(capsys):
    solver_demo.main(["--batch", "4", "--width", "16"])
    lines = capsys.readouterr().out.splitlines()
    words = [line.split() for line in lines if line.split()]
    rows = {w[0]: w for w in words if w[0] in solver_demo.ROOT_SOLVERS}
    assert set(rows) == {"broyden", "anderson", "fixed_point_iteration"}
    for name, cols in rows.items():
        fwd_steps, fwd_res, bwd_steps, bwd_res, grad_norm = map(float, cols[1:6])
        assert fwd_steps >= 1 and fwd_res < 1e-4, (name, cols)
        assert bwd_steps >= 1 and bwd_res < 1e-4, (name, cols)
        assert grad_norm > 0, (name, cols)
    exact = next(line for line in lines if "Hutchinson" in line).split()[-1]
    assert float(exact) > 0

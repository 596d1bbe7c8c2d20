"""The Prometheus text the metrics endpoint serves."""

from __future__ import annotations

from cloudstate_proxy.metrics import Gauge, Metrics


def test_commands_and_latency_render_as_counters_and_a_histogram() -> None:
    metrics = Metrics()
    metrics.command_finished("a.S", "M", "OK", 0.0004)
    metrics.command_finished("a.S", "M", "OK", 0.02)
    metrics.command_finished("a.S", "M", "UNKNOWN", 30.0)
    text = metrics.render()
    lines = text.splitlines()
    assert 'cloudstate_proxy_commands_total{service="a.S",method="M",status="OK"} 2' in lines
    assert 'cloudstate_proxy_commands_total{service="a.S",method="M",status="UNKNOWN"} 1' in lines
    buckets = {
        line.split('le="')[1].split('"')[0]: int(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("cloudstate_proxy_command_seconds_bucket")
    }
    # Cumulative: 0.4 ms is under 1 ms, 20 ms under 25 ms, 30 s only under +Inf.
    assert buckets["0.001"] == 1
    assert buckets["0.01"] == 1
    assert buckets["0.025"] == 2
    assert buckets["10"] == 2
    assert buckets["+Inf"] == 3
    assert 'cloudstate_proxy_command_seconds_count{service="a.S",method="M"} 3' in lines
    assert 'cloudstate_proxy_command_seconds_sum{service="a.S",method="M"} 30.020400' in lines
    assert text.endswith("\n")
    assert metrics.commands("a.S", "M", "OK") == 2


def test_gauges_are_read_at_scrape_time_and_broken_ones_left_out() -> None:
    metrics = Metrics()
    value = [3]

    def broken() -> float:
        raise RuntimeError("gone")

    metrics.add_gauges(
        [
            Gauge("x_live", "Live things.", lambda: value[0]),
            Gauge("x_total", "Things done.", lambda: 7, "counter"),
            Gauge("x_broken", "Never readable.", broken),
        ]
    )
    value[0] = 5
    lines = metrics.render().splitlines()
    assert "# TYPE x_live gauge" in lines and "x_live 5" in lines
    assert "# TYPE x_total counter" in lines and "x_total 7" in lines
    assert not any("x_broken" in line for line in lines)


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.command_finished('we"ird\\svc', "M\n", "OK", 0.1)
    assert (
        'cloudstate_proxy_commands_total{service="we\\"ird\\\\svc",method="M\\n",status="OK"} 1'
        in metrics.render().splitlines()
    )

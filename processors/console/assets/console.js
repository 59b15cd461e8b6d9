// Herald console: the overview chart (uPlot) and its refresh. Data comes from the page
// (#overview-data) and then from /overview/data every 5 s.
(function () {
  var el = document.getElementById("overview-data");
  var box = document.getElementById("chart");
  if (!el || !box) return;
  var plot = null;
  var latencyBox = document.getElementById("latency-chart");
  var latencyPlot = null;
  function drawLatency(d) {
    if (!latencyBox) return;
    var names = Object.keys(d.p99 || {});
    var data = [d.series.x].concat(names.map(function (n) { return d.p99[n]; }));
    var opts = {
      width: Math.max(latencyBox.clientWidth - 12, 300), height: 200,
      series: [{}].concat(names.map(function (n, i) {
        return { label: n + " p99", stroke: colors[i % colors.length], width: 2, spanGaps: true };
      })),
      axes: [{}, { label: "ms" }]
    };
    if (latencyPlot) latencyPlot.destroy();
    latencyBox.innerHTML = "";
    latencyPlot = new uPlot(opts, data, latencyBox);
  }
  var colors = ["#2f5bea", "#1e8e3e", "#c0392b", "#8e44ad", "#e67e22", "#16a085", "#7f8c8d", "#d35400"];
  function draw(d) {
    var names = Object.keys(d.series.channels);
    var data = [d.series.x].concat(names.map(function (n) { return d.series.channels[n]; }));
    var opts = {
      width: Math.max(box.clientWidth - 12, 300), height: 240,
      series: [{}].concat(names.map(function (n, i) {
        return { label: n, stroke: colors[i % colors.length], width: 2 };
      })),
      axes: [{}, { label: "messages / min" }]
    };
    if (plot) plot.destroy();
    box.innerHTML = "";
    plot = new uPlot(opts, data, box);
    box.setAttribute("data-points", String(d.total));
    drawLatency(d);
  }
  function update(d) {
    el.textContent = JSON.stringify(d);
    var t = document.getElementById("tile-total");
    if (t) t.textContent = d.total;
    var r = document.getElementById("tile-rate");
    if (r) r.textContent = d.success_rate == null ? "–" : (d.success_rate * 100).toFixed(1) + " %";
    draw(d);
  }
  var first = JSON.parse(el.textContent);
  draw(first);
  setInterval(function () {
    fetch("/overview/data?minutes=" + first.minutes, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (d) { if (d) update(d); })
      .catch(function () {});
  }, 5000);
})();

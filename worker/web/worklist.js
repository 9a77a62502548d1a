// Refreshes the worklist table without reloading the page, and applies the filters in place.
(function () {
  const form = document.getElementById("filters");
  const body = document.getElementById("rows");
  const stamp = document.getElementById("updated");
  const every = Number(document.body.dataset.refresh || "10") * 1000;
  function query() {
    const params = new URLSearchParams();
    for (const [k, v] of new FormData(form)) { if (v) params.append(k, v); }
    return params.toString();
  }
  async function refresh() {
    const q = query();
    try {
      const rsp = await fetch("/rows" + (q ? "?" + q : ""), { credentials: "same-origin" });
      if (rsp.status === 200) {
        body.innerHTML = await rsp.text();
        stamp.textContent = new Date().toLocaleTimeString();
      } else if (rsp.redirected || rsp.status === 401) {
        window.location.reload();
      }
    } catch (e) { stamp.textContent = "refresh failed, retrying"; }
  }
  form.addEventListener("change", function () {
    const q = query();
    history.replaceState(null, "", q ? "/?" + q : "/");
    refresh();
  });
  form.addEventListener("submit", function (ev) { ev.preventDefault(); refresh(); });
  setInterval(refresh, every);
})();

// Leasehold dashboard: refresh the live part every ~2 s without reloading the page,
// and confirm a revoke in a dialog. No framework, no build step, no inline script.
(() => {
  "use strict";
  const PERIOD_MS = 2000;
  const live = document.getElementById("live");
  const updated = document.getElementById("updated");
  const dialog = document.getElementById("confirm-revoke");
  if (!live) return;
  const source = live.dataset.src;
  let lastOk = Date.now();

  async function refresh() {
    if (!document.hidden && !(dialog && dialog.open)) {
      try {
        const answer = await fetch(source, {
          credentials: "same-origin", cache: "no-store", headers: { Accept: "text/html" },
        });
        if (answer.status === 401) {  // the session expired or the key was retired
          window.location.assign("/dashboard/login");
          return;
        }
        if (answer.ok) {
          live.innerHTML = await answer.text();  // server-rendered, autoescaped markup
          lastOk = Date.now();
          const inner = live.querySelector(".live-inner");
          if (updated && inner) {
            updated.textContent = "updated " + inner.dataset.now + " UTC";
          }
        }
      } catch (err) {
        // Offline for a moment: keep the last view, mark it stale below.
      }
      if (updated) updated.classList.toggle("stale", Date.now() - lastOk > 3 * PERIOD_MS);
    }
    window.setTimeout(refresh, PERIOD_MS);

  // A one-off notice (after a revoke) fades once the live view has caught up,
  // and leaves the address bar clean so a reload does not show it again.
  const notice = document.getElementById("notice");
  if (notice) {
    window.setTimeout(() => notice.remove(), 4 * PERIOD_MS);
    const url = new URL(window.location.href);
    for (const done of ["revoked", "approved", "denied"]) url.searchParams.delete(done);
    window.history.replaceState(null, "", url.pathname + url.search);
  }
  }
  window.setTimeout(refresh, PERIOD_MS);

  // A click on "Revoke" opens the confirmation instead of following the link
  // (the link itself leads to the same confirmation as a page).
  if (dialog) {
    const form = dialog.querySelector("form");
    live.addEventListener("click", (event) => {
      const link = event.target.closest("a.revoke");
      if (!link) return;
      event.preventDefault();
      form.action = link.getAttribute("href");
      dialog.querySelector(".what").textContent = link.dataset.what || "";
      dialog.showModal();
    });
    dialog.querySelector("button.cancel").addEventListener("click", () => dialog.close());
  }
})();
